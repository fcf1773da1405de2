"""Typed, validated records of CogStream QA files (protocol 1.2, 1.3, 1.5).

Each parser raises `DataError` naming the file and the field path (e.g. `QA_Dataset/v.json: [0][3].info.COI`),
so a bad dataset fails at load time instead of silently training on shifted clips or wrong targets.
"""
from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from typing import Any, Sequence

from cogstream_jax.errors import DataError

CAPABILITIES = (
    "Basic/Attributes",
    "Basic/Items",
    "Basic/Co-reference",
    "Basic/Actions",
    "Streaming/Reasoning",
    "Streaming/Sequence Perception",
    "Streaming/Dialogue Recalling",
    "Streaming/Dynamic Updating",
    "Streaming/Object Tracking",
    "Global/Overall Summary",
    "Global/Global Analysis",
)
# L3 tags that the official analysis (step1b) merges into Streaming/Reasoning (protocol 3.4).
REASONING_ALIASES = (
    "Reasoning", "Analysis", "Causality", "Causal Discovery", "Causal discovery", "Ingredients Analysis",
    "Intention", "Prediction",
)


@dataclass(frozen=True)
class QARecord:
    """One QA of a chain. `coi` is in the file's order (relevance score, highest first); `relevance` is 0/1."""

    question: str
    answer: str
    time: float
    is_visual: bool
    event_time: float
    qa_id: int
    coi: tuple[int, ...]
    relevance: tuple[int, ...]
    relevance_text: str  # the original string, saved as `coi` in result files


@dataclass(frozen=True)
class Chain:
    """One dialogue path; `labels` are the capability labels from VQA_Dataset (None when absent)."""

    index: int
    qas: tuple[QARecord, ...]
    labels: tuple[str, ...] | None = None


def canonical_capability(label: str) -> str:
    """Map a raw label to one of the 11 table capabilities (L3 reasoning variants merge into Reasoning)."""
    if label in CAPABILITIES:
        return label
    level, _, name = label.partition("/")
    if level == "Streaming" and name in REASONING_ALIASES:
        return "Streaming/Reasoning"
    return label


def _field(obj: Any, key: str, where: str, kinds: type | tuple[type, ...]) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{where}.{key}: missing")
    value = obj[key]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _as_tuple(kinds)):
        raise DataError(f"{where}.{key}: expected {_kind_names(kinds)}, got {type(value).__name__}")
    return value


def _as_tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _kind_names(kinds: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kinds))


def parse_coi(value: Any, where: str) -> tuple[int, ...]:
    """COI: a string that `ast.literal_eval` reads as a list of ints (stage 2 uses literal_eval)."""
    try:
        parsed = ast.literal_eval(value) if isinstance(value, str) else value
    except (ValueError, SyntaxError):
        raise DataError(f"{where}: COI {value!r} is not a readable list of ints") from None
    if not isinstance(parsed, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in parsed):
        raise DataError(f"{where}: COI {value!r} is not a list of ints")
    return tuple(parsed)


def parse_relevance(value: Any, where: str) -> tuple[int, ...]:
    """relevance: a JSON list of 0/1 (string, as shipped; a plain list is accepted like stage 1 does)."""
    try:
        parsed = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        raise DataError(f"{where}: relevance {value!r} is not a JSON list") from None
    if not isinstance(parsed, list) or any(r not in (0, 1) or isinstance(r, bool) for r in parsed):
        raise DataError(f"{where}: relevance {value!r} must be a list of 0/1")
    return tuple(int(r) for r in parsed)


def parse_qa(raw: Any, position: int, where: str, warnings: list[str]) -> QARecord:
    info = _field(raw, "info", where, dict)
    qa_id = _field(info, "ID", f"{where}.info", int)
    if qa_id != position:
        raise DataError(f"{where}.info.ID: {qa_id} but the QA is at chain position {position}")
    coi = parse_coi(_field(info, "COI", f"{where}.info", (str, list)), f"{where}.info.COI")
    relevance_raw = _field(info, "relevance", f"{where}.info", (str, list))
    relevance = parse_relevance(relevance_raw, f"{where}.info.relevance")
    if len(relevance) != qa_id:
        raise DataError(f"{where}.info.relevance: length {len(relevance)} != ID {qa_id}")
    bad = [i for i in coi if not 0 <= i < qa_id]
    if bad:
        raise DataError(f"{where}.info.COI: indices {bad} are not earlier chain positions (ID {qa_id})")
    if sorted(set(coi)) != [i for i, r in enumerate(relevance) if r]:
        warnings.append(f"{where}.info: COI {list(coi)} and relevance {list(relevance)} disagree")
    return QARecord(
        question=_field(raw, "Q", where, str),
        answer=_field(raw, "A", where, str),
        time=float(_field(raw, "T", where, (int, float))),
        is_visual=_field(info, "is_visual", f"{where}.info", bool),
        event_time=float(_field(info, "Event_Time", f"{where}.info", (int, float))),
        qa_id=qa_id,
        coi=coi,
        relevance=relevance,
        relevance_text=relevance_raw if isinstance(relevance_raw, str) else json.dumps(relevance_raw),
    )


def parse_chains(data: Any, where: str, warnings: list[str]) -> tuple[Chain, ...]:
    """A QA_Dataset file: a non-empty list of chains, each a non-empty list of QA dicts with ID == position."""
    if not isinstance(data, list) or not data or not all(isinstance(c, list) for c in data):
        raise DataError(f"{where}: top level must be a non-empty list of chains (lists of QA dicts)")
    chains = []
    for c, raw_chain in enumerate(data):
        if not raw_chain:
            raise DataError(f"{where}: [{c}] is an empty chain")
        qas = tuple(parse_qa(raw, k, f"{where}: [{c}][{k}]", warnings) for k, raw in enumerate(raw_chain))
        for k in range(1, len(qas)):
            if qas[k].event_time < qas[k - 1].event_time:
                raise DataError(
                    f"{where}: [{c}][{k}].info.Event_Time: {qas[k].event_time} decreases "
                    f"(previous QA has {qas[k - 1].event_time})"
                )
        chains.append(Chain(index=c, qas=qas))
    return tuple(chains)


def parse_vqa_labels(data: Any, where: str, chains: Sequence[Chain], warnings: list[str]) -> tuple[Chain, ...]:
    """Attach VQA_Dataset capability labels to the chains (same chain order, one Data item per QA)."""
    if not isinstance(data, list) or not all(isinstance(c, dict) for c in data):
        raise DataError(f"{where}: top level must be a list of {{video_name, seq_info, Data}} chains")
    if len(data) != len(chains):
        warnings.append(f"{where}: {len(data)} chains but the QA file has {len(chains)}")
    out = []
    for c, chain in enumerate(chains):
        if c >= len(data):
            out.append(chain)
            continue
        items = _field(data[c], "Data", f"{where}: [{c}]", list)
        if len(items) != len(chain.qas):
            raise DataError(f"{where}: [{c}].Data has {len(items)} items but the QA chain has {len(chain.qas)}")
        labels = []
        for k, item in enumerate(items):
            label = _field(item, "label", f"{where}: [{c}].Data[{k}]", str)
            if canonical_capability(label) not in CAPABILITIES:
                warnings.append(f"{where}: [{c}].Data[{k}].label: {label!r} is not one of the 11 capabilities")
            labels.append(label)
        out.append(Chain(index=chain.index, qas=chain.qas, labels=tuple(labels)))
    return tuple(out)
