"""Retrieval quality of Historic Dialogue Retrieval: `predicted_coi` against the ground-truth `coi`.

Global figures follow the official step1a: per QA both 0/1 vectors are zero-padded to the same length, all QAs
are flattened into one binary problem, and sklearn's binary accuracy/precision/recall/F1 are taken (an empty
denominator gives 0, sklearn's zero_division default). Added here: per-QA macro averages, and the accuracy of
`predicted_visual` against the dataset's `is_visual`, which the official code never scores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from cogstream_jax.scoring.join import QARecord


@dataclass(frozen=True)
class BinaryCounts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: "BinaryCounts") -> "BinaryCounts":
        return BinaryCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / self.total if self.total else 0.0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def summary(self) -> dict[str, float | int]:
        return {"accuracy": self.accuracy, "precision": self.precision, "recall": self.recall, "f1": self.f1,
                "tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn}


def count_pairs(truth: Iterable[int], predicted: Iterable[int]) -> BinaryCounts:
    """Confusion counts of two 0/1 sequences, the shorter zero-padded (official step1a)."""
    truth, predicted = list(truth), list(predicted)
    width = max(len(truth), len(predicted))
    truth += [0] * (width - len(truth))
    predicted += [0] * (width - len(predicted))
    tp = sum(1 for t, p in zip(truth, predicted) if t and p)
    fp = sum(1 for t, p in zip(truth, predicted) if p and not t)
    fn = sum(1 for t, p in zip(truth, predicted) if t and not p)
    return BinaryCounts(tp=tp, fp=fp, fn=fn, tn=width - tp - fp - fn)


def _per_qa_scores(counts: BinaryCounts) -> tuple[float, float, float, float]:
    """Per-QA accuracy/precision/recall/F1; when nothing is relevant and nothing predicted, all are 1."""
    precision = counts.precision if counts.tp + counts.fp else float(counts.fn == 0)
    recall = counts.recall if counts.tp + counts.fn else float(counts.fp == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return counts.accuracy, precision, recall, f1


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def retrieval_report(records: Iterable[QARecord]) -> dict:
    """Flattened (official) and per-QA macro retrieval scores plus the predicted_visual accuracy."""
    flat = BinaryCounts()
    macro: list[tuple[float, float, float, float]] = []
    visual = BinaryCounts()  # positive class: "the video is needed"
    for record in records:
        counts = count_pairs(record.qa.coi, record.qa.predicted_coi)
        flat = flat + counts
        if counts.total:
            macro.append(_per_qa_scores(counts))
        if record.qa.qa_id > 0:  # QA 0 has no retrieval step: predicted_visual is forced to true
            visual = visual + count_pairs([int(record.label.is_visual)], [int(record.qa.predicted_visual)])
    columns = list(zip(*macro)) if macro else [[], [], [], []]
    return {
        "flattened": flat.summary(),
        "per_qa_macro": {"accuracy": _mean(list(columns[0])), "precision": _mean(list(columns[1])),
                         "recall": _mean(list(columns[2])), "f1": _mean(list(columns[3])), "n_qas": len(macro)},
        "visual": {"accuracy": visual.accuracy, "n_qas": visual.total, "tp": visual.tp, "fp": visual.fp,
                   "fn": visual.fn, "tn": visual.tn},
    }
