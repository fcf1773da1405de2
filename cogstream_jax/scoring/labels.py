"""Capability labels and `is_visual` from `VQA_Dataset/{video}.json` (protocol 1.3 and 3.4).

Kept minimal on purpose: the scorer needs, per chain position, the capability class, its level, whether the
question needs the video, and the segment it belongs to (for the coherence scores). Fine-grained L3 tags are
merged into "Streaming/Reasoning" as the official step1b does.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogstream_jax.errors import DataError
from cogstream_jax.io_utils import as_given

# The 11 classes in the paper's column order (protocol 3.4 / 3.5), with the table header of each.
CAPABILITIES: tuple[tuple[str, str], ...] = (
    ("Basic/Attributes", "Att."),
    ("Basic/Items", "Obj."),
    ("Basic/Co-reference", "Co-ref."),
    ("Basic/Actions", "Act."),
    ("Streaming/Reasoning", "Rea."),
    ("Streaming/Sequence Perception", "Seq."),
    ("Streaming/Dialogue Recalling", "Dial."),
    ("Streaming/Dynamic Updating", "Dyn."),
    ("Streaming/Object Tracking", "Obj."),
    ("Global/Overall Summary", "Over."),
    ("Global/Global Analysis", "Glob."),
)
CAPABILITY_NAMES: tuple[str, ...] = tuple(name for name, _ in CAPABILITIES)
LEVEL_NAMES: tuple[str, ...] = ("Basic", "Streaming", "Global")

# Official step1b merges these L3 tags into one "Streaming/Reasoning" column.
REASONING_TAGS = frozenset({
    "Streaming/Reasoning", "Streaming/Analysis", "Streaming/Causality", "Streaming/Causal Discovery",
    "Streaming/Causal discovery", "Streaming/Ingredients Analysis", "Streaming/Intention", "Streaming/Prediction",
})
# Labels the official LEVELS table knows although they are not paper columns: scored, shown apart.
EXTRA_LABELS = frozenset({"Basic/Environment"})
# Official step1b skips these in every judge aggregate (INVALID_LABEL); retrieval still counts them.
EXCLUDED_LABELS = frozenset({"Streaming/Temporal Perception"})

_SEGMENT_NUMBER = re.compile(r"_segment_(\d+)\.\w+$")


@dataclass(frozen=True)
class QALabel:
    """Dataset facts about one chain position that the result file does not carry."""

    label: str          # canonical class, e.g. "Streaming/Reasoning"
    level: str          # "Basic" | "Streaming" | "Global"
    is_visual: bool
    segment: int        # segment number from segment_path (1-based); QAs of one segment are adjacent
    question: str

    @property
    def judged(self) -> bool:
        """False for labels the official aggregation leaves out of every judge score."""
        return self.label not in EXCLUDED_LABELS


def canonical_label(raw: str, where: str) -> tuple[str, str]:
    """Map a dataset label to (class, level); raise DataError for labels no official table knows."""
    label = raw.strip()
    if label in REASONING_TAGS:
        label = "Streaming/Reasoning"
    level = label.split("/", 1)[0]
    known = label in CAPABILITY_NAMES or label in EXTRA_LABELS or label in EXCLUDED_LABELS
    if not known or level not in LEVEL_NAMES:
        raise DataError(f"{where}.label: unknown capability label {raw!r}")
    return label, level


def _segment_number(item: dict[str, Any], where: str) -> int:
    path = item.get("segment_path")
    if isinstance(path, str):
        match = _SEGMENT_NUMBER.search(path)
        if match:
            return int(match.group(1))
    stamp = item.get("segment_timestamp")
    if isinstance(stamp, (int, float)) and not isinstance(stamp, bool):
        return int(round(float(stamp) * 1000))  # segment end in ms: same segment, same number
    raise DataError(f"{where}: needs 'segment_path' (..._segment_<n>.mp4) or 'segment_timestamp'")


def _question(item: dict[str, Any]) -> str:
    pairs = item.get("QA_pairs")
    if isinstance(pairs, dict):
        for key, value in pairs.items():
            if str(key).startswith("Q") and isinstance(value, str):
                return value
    return ""


def _parse_item(item: Any, position: int, where: str) -> QALabel:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object, got {type(item).__name__}")
    if "ID" in item and item["ID"] != position:
        raise DataError(f"{where}.ID: expected the chain position {position}, got {item['ID']!r}")
    raw_label = item.get("label")
    if not isinstance(raw_label, str) or not raw_label.strip():
        raise DataError(f"{where}.label: missing capability label")
    is_visual = item.get("is_visual")
    if not isinstance(is_visual, bool):
        raise DataError(f"{where}.is_visual: expected true/false, got {is_visual!r}")
    label, level = canonical_label(raw_label, where)
    return QALabel(label=label, level=level, is_visual=is_visual, segment=_segment_number(item, where),
                   question=_question(item))


def vqa_dir(dataset_dir: Path) -> Path:
    """The VQA_Dataset folder of a split directory; a clear error when the user points elsewhere."""
    folder = as_given(dataset_dir) / "VQA_Dataset"
    if not folder.is_dir():
        raise DataError(f"--dataset_dir {dataset_dir}: has no VQA_Dataset folder (the labelled chains, protocol 1.3)")
    return folder


def load_video_labels(dataset_dir: Path, video_name: str) -> list[list[QALabel]]:
    """Labels of every chain of one video, indexed [chain][position]."""
    path = vqa_dir(dataset_dir) / f"{video_name}.json"
    if not path.is_file():
        raise DataError(f"{path}: video {video_name!r} is not in the dataset (no VQA_Dataset file)")
    try:
        chains = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: corrupt dataset JSON ({exc})") from None
    if not isinstance(chains, list) or not chains:
        raise DataError(f"{path}: expected a non-empty list of chains")
    labels = []
    for index, chain in enumerate(chains):
        where = f"{path}: [{index}]"
        data = chain.get("Data") if isinstance(chain, dict) else None
        if not isinstance(data, list):
            raise DataError(f"{where}.Data: missing list of QA items")
        labels.append([_parse_item(item, pos, f"{where}.Data[{pos}]") for pos, item in enumerate(data)])
    return labels
