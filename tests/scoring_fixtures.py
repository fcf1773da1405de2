"""Test helpers for the scoring tests: tiny VQA_Dataset folders and protocol-2.5 result files on disk."""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass


@dataclass(frozen=True)
class QASpec:
    """One QA of a fixture chain: dataset facts plus what the model "predicted"."""

    label: str
    segment: int
    question: str
    answer: str
    prediction: str
    coi: tuple[int, ...] = ()
    predicted_coi: tuple[int, ...] = ()
    is_visual: bool = True
    predicted_visual: bool = True


def write_dataset(root: pathlib.Path, videos: dict[str, list[list[QASpec]]]) -> pathlib.Path:
    """Write `root/VQA_Dataset/{video}.json` (protocol 1.3) and return `root`."""
    folder = root / "VQA_Dataset"
    folder.mkdir(parents=True, exist_ok=True)
    for video, chains in videos.items():
        payload = []
        for index, chain in enumerate(chains):
            data = [{
                "segment_path": f"Test_dataset/event_segments/{video}/{video}_segment_{qa.segment}.mp4",
                "segment_timestamp": 10.0 * qa.segment, "event_timestamp": 10.0 * qa.segment,
                "label": qa.label, "is_visual": qa.is_visual,
                "QA_pairs": {f"Q{pos + 1}": f"[Tag] {qa.question}", f"A{pos + 1}": qa.answer},
                "ID": pos, "COI": str([i for i, bit in enumerate(qa.coi) if bit]), "relevance": json.dumps(list(qa.coi)),
            } for pos, qa in enumerate(chain)]
            payload.append({"video_name": video, "seq_info": f"{index + 1}/{len(chains)}", "Data": data})
        (folder / f"{video}.json").write_text(json.dumps(payload, indent=1))
    return root


def result_chain(chain: list[QASpec]) -> list[dict]:
    return [{"qa_id": pos, "question": qa.question, "answer": qa.answer, "prediction": qa.prediction,
             "predicted_coi": list(qa.predicted_coi), "predicted_visual": qa.predicted_visual,
             "coi": json.dumps(list(qa.coi))} for pos, qa in enumerate(chain)]


def write_results(results_dir: pathlib.Path, videos: dict[str, list[list[QASpec]]]) -> pathlib.Path:
    """Write `{results_dir}/{video}.json` = {"video_name", "Data": [chain, ...]} (protocol 2.5)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    for video, chains in videos.items():
        payload = {"video_name": video, "Data": [result_chain(chain) for chain in chains]}
        (results_dir / f"{video}.json").write_text(json.dumps(payload, indent=1))
    return results_dir


def scripted(ia: int, dc: int, ca: int, tp: int, lc: int) -> str:
    """A prediction text from which the scripted judge server reads the score of each metric."""
    return f"ia{ia} dc{dc} ca{ca} tp{tp} lc{lc}"
