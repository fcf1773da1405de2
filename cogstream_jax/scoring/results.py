"""Reading and validating result files (protocol 2.5).

A result file is `{save_dir}/{video}.json` = `{"video_name": v, "Data": [chain, ...]}`, each chain a list of
per-QA dicts `{qa_id, question, answer, prediction, predicted_coi, predicted_visual, coi}`. Runs made with
`--chains all` hold several chains; chain k is the dataset's chain k unless the file names its chains in an
optional top-level `chain_ids` list. Every problem is reported with the file and the field at fault, and a bad
file never stops the others from being scored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogstream_jax.errors import DataError
from cogstream_jax.io_utils import as_given

REQUIRED_QA_FIELDS = ("qa_id", "question", "answer", "prediction", "predicted_coi", "predicted_visual", "coi")


@dataclass(frozen=True)
class QAResult:
    """One answered question. `coi` is the ground-truth relevance vector over earlier chain positions."""

    qa_id: int
    question: str
    answer: str
    prediction: str
    predicted_coi: tuple[int, ...]
    predicted_visual: bool
    coi: tuple[int, ...]
    error: str | None = None  # set by our evaluation run when answering this QA failed (prediction is "")


@dataclass(frozen=True)
class ChainResult:
    chain_id: int
    qas: tuple[QAResult, ...]


@dataclass(frozen=True)
class VideoResult:
    path: Path
    video_name: str
    chains: tuple[ChainResult, ...]


@dataclass(frozen=True)
class SkippedFile:
    """A result file that could not be scored, with a message naming the file and field."""

    path: Path
    reason: str


def parse_binary_vector(value: Any, where: str) -> tuple[int, ...]:
    """Read a 0/1 list given as a list or as a JSON string ("[1, 0]"; "null" and "" mean empty)."""
    if isinstance(value, str):
        text = value.strip()
        if text in ("", "null"):
            return ()
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not a JSON list of 0/1 ({exc.msg}): {text[:60]!r}") from None
    if value is None:
        return ()
    if not isinstance(value, list):
        raise DataError(f"{where}: expected a list of 0/1, got {type(value).__name__}")
    bits = []
    for bit in value:
        if isinstance(bit, bool) or bit not in (0, 1):
            raise DataError(f"{where}: entries must be 0 or 1, got {bit!r}")
        bits.append(int(bit))
    return tuple(bits)


def _parse_qa(raw: Any, position: int, where: str) -> QAResult:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object, got {type(raw).__name__}")
    missing = [name for name in REQUIRED_QA_FIELDS if name not in raw]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
    qa_id = raw["qa_id"]
    if isinstance(qa_id, bool) or not isinstance(qa_id, int) or qa_id != position:
        raise DataError(f"{where}.qa_id: expected the chain position {position}, got {qa_id!r}")
    for name in ("question", "answer", "prediction"):
        if not isinstance(raw[name], str):
            raise DataError(f"{where}.{name}: expected a string, got {type(raw[name]).__name__}")
    if not isinstance(raw["predicted_visual"], bool):
        raise DataError(f"{where}.predicted_visual: expected true/false, got {raw['predicted_visual']!r}")
    coi = parse_binary_vector(raw["coi"], f"{where}.coi")
    if any(coi[position:]):
        raise DataError(f"{where}.coi: marks a QA at or after position {position} as context")
    return QAResult(
        qa_id=qa_id,
        question=raw["question"],
        answer=raw["answer"],
        prediction=raw["prediction"],
        predicted_coi=parse_binary_vector(raw["predicted_coi"], f"{where}.predicted_coi"),
        predicted_visual=raw["predicted_visual"],
        coi=coi,
        error=str(raw["error"]) if raw.get("error") is not None else None,
    )


def load_result_file(path: Path) -> VideoResult:
    """Parse and validate one result file; raise DataError naming the file and field on any problem."""
    path = as_given(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: corrupt result JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read result file ({exc})") from None
    if not isinstance(payload, dict):
        raise DataError(f"{path}: expected an object with 'video_name' and 'Data', got {type(payload).__name__}")
    video_name = payload.get("video_name")
    if not isinstance(video_name, str) or not video_name:
        raise DataError(f"{path}: field 'video_name' is missing or not a string")
    if video_name != path.stem:
        raise DataError(f"{path}: field 'video_name' is {video_name!r} but the file is named {path.stem!r}")
    chains_raw = payload.get("Data")
    if not isinstance(chains_raw, list) or not chains_raw:
        raise DataError(f"{path}: field 'Data' must be a non-empty list of chains")
    chain_ids = payload.get("chain_ids", list(range(len(chains_raw))))
    if (not isinstance(chain_ids, list) or len(chain_ids) != len(chains_raw)
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in chain_ids)
            or len(set(chain_ids)) != len(chain_ids)):
        raise DataError(f"{path}: field 'chain_ids' must list one distinct non-negative int per chain in 'Data'")
    chains = []
    for index, (chain_id, chain_raw) in enumerate(zip(chain_ids, chains_raw)):
        where = f"{path}: Data[{index}]"
        if not isinstance(chain_raw, list) or not chain_raw:
            raise DataError(f"{where}: expected a non-empty list of QA results")
        qas = tuple(_parse_qa(raw, pos, f"{where}[{pos}]") for pos, raw in enumerate(chain_raw))
        chains.append(ChainResult(chain_id=chain_id, qas=qas))
    return VideoResult(path=path, video_name=video_name, chains=tuple(chains))


def _is_scoring_report(path: Path) -> bool:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(payload, dict) and str(payload.get("schema", "")).startswith("cogstream-jax-scoring/")


def load_results_dir(results_dir: Path) -> tuple[list[VideoResult], list[SkippedFile]]:
    """Load every `*.json` in `results_dir` (sorted); bad files are returned as SkippedFile, not raised."""
    results_dir = as_given(results_dir)
    if not results_dir.is_dir():
        raise DataError(f"--results_dir {results_dir}: not a directory")
    files = sorted(results_dir.glob("*.json"))
    if not files:
        raise DataError(f"--results_dir {results_dir}: no result files (*.json)")
    loaded, skipped = [], []
    for path in files:
        try:
            loaded.append(load_result_file(path))
        except DataError as exc:
            if not _is_scoring_report(path):  # output_dir == results_dir: our own report is not a result
                skipped.append(SkippedFile(path=path, reason=str(exc)))
    return loaded, skipped
