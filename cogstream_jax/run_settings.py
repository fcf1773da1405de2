"""Settings that define what a long job computes, compared when the job is resumed: a training run resumed
from its checkpoints, or an evaluation rerun into a folder of finished result files. Mixing the outputs of two
different settings silently is the failure this prevents."""
from __future__ import annotations

import json
from typing import Any, Mapping


def as_json(settings: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-normal values (paths and other objects as strings), so saved and current settings compare equal."""
    return json.loads(json.dumps(dict(settings), default=str, sort_keys=True))


def describe_changes(saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> str | None:
    """`"key: old -> new, ..."` for every setting that differs, or None (also when either side is unknown)."""
    if saved is None or current is None:
        return None
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if not changed:
        return None
    return ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
