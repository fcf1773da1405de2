"""Joining result chains with the dataset's labels, chain by chain and position by position."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cogstream_jax.errors import DataError
from cogstream_jax.scoring.labels import QALabel, load_video_labels
from cogstream_jax.scoring.results import QAResult, SkippedFile, VideoResult

_TAG = re.compile(r"^\s*\[[^\]]*\]\s*")


@dataclass(frozen=True)
class QARecord:
    """Everything the scorer knows about one answered question."""

    video: str
    chain_id: int
    qa: QAResult
    label: QALabel


@dataclass(frozen=True)
class JoinedResults:
    records: tuple[QARecord, ...]
    skipped: tuple[SkippedFile, ...]
    question_mismatches: tuple[str, ...]  # "video chain k position i", text differs from the dataset


def _normalise(question: str) -> str:
    return " ".join(_TAG.sub("", question).split()).lower()


def join_video(video: VideoResult, dataset_dir: Path, allow_partial: bool = False) -> tuple[list[QARecord], list[str]]:
    """Records of one video; DataError (naming the result file) on missing chains or QA count mismatch.

    With `allow_partial`, a chain may be a prefix of the dataset chain (runs with --max_questions).
    """
    try:
        labels = load_video_labels(dataset_dir, video.video_name)
    except DataError as exc:
        raise DataError(f"{video.path}: {exc}") from None
    records, mismatches = [], []
    for chain in video.chains:
        if chain.chain_id >= len(labels):
            raise DataError(f"{video.path}: chain {chain.chain_id} not in the dataset, which has "
                            f"{len(labels)} chain(s)")
        chain_labels = labels[chain.chain_id]
        too_short_ok = allow_partial and len(chain.qas) < len(chain_labels)
        if len(chain.qas) != len(chain_labels) and not too_short_ok:
            raise DataError(f"{video.path}: chain {chain.chain_id} has {len(chain.qas)} QA results but the dataset "
                            f"chain has {len(chain_labels)} QAs (mismatched QA counts"
                            f"{'' if allow_partial else '; --allow_partial_chains scores prefixes'})")
        for qa, label in zip(chain.qas, chain_labels):
            if label.question and _normalise(label.question) != _normalise(qa.question):
                mismatches.append(f"{video.video_name} chain {chain.chain_id} position {qa.qa_id}")
            records.append(QARecord(video=video.video_name, chain_id=chain.chain_id, qa=qa, label=label))
    return records, mismatches


def join_results(videos: list[VideoResult], skipped: list[SkippedFile], dataset_dir: Path,
                 allow_partial: bool = False) -> JoinedResults:
    """Join all loaded videos; a video that does not fit the dataset is skipped with its reason."""
    records, all_skipped, mismatches = [], list(skipped), []
    for video in videos:
        try:
            video_records, video_mismatches = join_video(video, dataset_dir, allow_partial)
        except DataError as exc:
            all_skipped.append(SkippedFile(path=video.path, reason=str(exc)))
            continue
        records.extend(video_records)
        mismatches.extend(video_mismatches)
    return JoinedResults(records=tuple(records), skipped=tuple(all_skipped), question_mismatches=tuple(mismatches))
