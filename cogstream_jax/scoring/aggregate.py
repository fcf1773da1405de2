"""Aggregation of per-QA judge scores exactly as protocol 3.2 (official step1b) with its bugs fixed.

- Per metric: mean over all scored QAs x10 (0..100). "Avg" = mean of the five metric means, i.e. QA-weighted;
  it is NOT the mean of the 11 capability columns.
- Per capability: per QA the mean of its metric scores, averaged over the QAs of that class, x10.
- Per level: per metric mean x10, plus "Mean" over all scores of the level pooled.
- Coherence: 1 - mean |difference| of consecutive normalised (score/10) values, x100. Inter: per-QA means
  inside one segment, averaged over segments with >= 2 scored QAs. Exter: segment means along one chain,
  averaged over chains with >= 2 segments. (Official: seeded both lists with a fake 0, never closed the last
  segment, returned 1 instead of 10 for short lists; see docs/fidelity.md.)
Labels the official code excludes (Streaming/Temporal Perception) are left out of every judge aggregate.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from itertools import groupby
from typing import Iterable, Sequence

from cogstream_jax.scoring import METRICS
from cogstream_jax.scoring.labels import CAPABILITY_NAMES, EXCLUDED_LABELS, LEVEL_NAMES


@dataclass(frozen=True)
class ScoredQA:
    video: str
    chain_id: int
    qa_id: int
    label: str
    level: str
    segment: int
    scores: dict[str, int] = field(default_factory=dict)  # metric -> 0..10; a missing metric is unscored

    @property
    def mean(self) -> float | None:
        values = [self.scores[m] for m in METRICS if m in self.scores]
        return sum(values) / len(values) if values else None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _x10(value: float | None) -> float | None:
    return None if value is None else value * 10


def adjacent_coherence(values: Sequence[float]) -> float:
    """1 - mean |consecutive difference| of 0..10 values normalised to 0..1 (needs >= 2 values)."""
    diffs = [abs(a - b) / 10 for a, b in zip(values, values[1:])]
    return 1 - sum(diffs) / len(diffs)


def coherence(qas: Iterable[ScoredQA]) -> dict[str, float | int | None]:
    """Inter (within segment) and exter (across segments) coherence, 0..100, with their sample counts."""
    by_chain: dict[tuple[str, int], list[ScoredQA]] = defaultdict(list)
    for qa in qas:
        if qa.mean is not None:
            by_chain[(qa.video, qa.chain_id)].append(qa)
    inter, exter = [], []
    for chain in by_chain.values():
        chain.sort(key=lambda qa: qa.qa_id)
        segment_means = []
        for _, run in groupby(chain, key=lambda qa: qa.segment):
            means = [qa.mean for qa in run]
            if len(means) >= 2:
                inter.append(adjacent_coherence(means))
            segment_means.append(sum(means) / len(means))
        if len(segment_means) >= 2:
            exter.append(adjacent_coherence(segment_means))
    inter_mean, exter_mean = _mean(inter), _mean(exter)
    return {"inter": None if inter_mean is None else inter_mean * 100, "inter_segments": len(inter),
            "exter": None if exter_mean is None else exter_mean * 100, "exter_chains": len(exter)}


def summarize(qas: Iterable[ScoredQA]) -> dict:
    """All judge aggregates of a set of scored QAs (one chain index, or everything)."""
    qas = list(qas)
    judged = [qa for qa in qas if qa.label not in EXCLUDED_LABELS]
    metric_means = {m: _x10(_mean([qa.scores[m] for qa in judged if m in qa.scores])) for m in METRICS}
    present = [value for value in metric_means.values() if value is not None]
    by_label: dict[str, list[float]] = defaultdict(list)
    level_metric: dict[str, dict[str, list[int]]] = {level: defaultdict(list) for level in LEVEL_NAMES}
    for qa in judged:
        if qa.mean is not None:
            by_label[qa.label].append(qa.mean)
        for metric, score in qa.scores.items():
            level_metric[qa.level][metric].append(score)
    capabilities = {name: _x10(_mean(by_label.get(name, []))) for name in CAPABILITY_NAMES}
    extra = {name: _x10(_mean(values)) for name, values in sorted(by_label.items()) if name not in capabilities}
    levels = {}
    for level, per_metric in level_metric.items():
        pooled = [score for scores in per_metric.values() for score in scores]
        levels[level] = {m: _x10(_mean(per_metric.get(m, []))) for m in METRICS} | {"Mean": _x10(_mean(pooled))}
    return {
        "n_qas": len(judged),
        "n_excluded_qas": len(qas) - len(judged),
        "metrics": metric_means,
        "Avg": sum(present) / len(present) if len(present) == len(METRICS) else None,
        "capabilities": capabilities,
        "capability_counts": {name: len(by_label.get(name, [])) for name in CAPABILITY_NAMES},
        "extra_capabilities": extra,
        "levels": levels,
        "coherence": coherence(judged),
    }
