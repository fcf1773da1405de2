"""On-disk cache of judgements, keyed by a hash of the judge identity and the exact prompt messages.

One small JSON file per judgement, written atomically, so an interrupted run loses at most the calls in
flight, concurrent workers never corrupt each other, and a rerun with the same judge costs nothing. The cache
may live in an object store (gs://...): each entry is then one object, written with one upload.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cogstream_jax.io_utils import as_given, atomic_write_json


def judgement_key(judge_identity: str, messages: list[dict[str, str]]) -> str:
    blob = json.dumps({"judge": judge_identity, "messages": messages}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCache:
    """`get`/`put` of score dicts under `root/<key[:2]>/<key>.json`; a corrupt entry counts as missing."""

    def __init__(self, root: Path) -> None:
        self.root = as_given(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, int] | None:
        path = self._path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        scores = entry.get("scores") if isinstance(entry, dict) else None
        if not isinstance(scores, dict) or not all(isinstance(v, int) for v in scores.values()):
            return None
        return scores

    def put(self, key: str, judge_identity: str, metric: str, scores: dict[str, int]) -> None:
        atomic_write_json(self._path(key), {"judge": judge_identity, "metric": metric, "scores": scores})
