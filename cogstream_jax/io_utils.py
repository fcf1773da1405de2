"""Atomic file writes: a crash or a full disk never leaves a half-written file (report, result, config,
cache entry, index) behind."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write to a temp file in the target folder, then os.replace it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def read_config_json(source: Any, filename: str) -> tuple[dict, str]:
    """A JSON config given as a dict, a file path or the folder holding `filename` -> (dict, where it came from).

    Missing or malformed files raise ConfigError naming the file.
    """
    from cogstream_jax.errors import ConfigError

    if isinstance(source, dict):
        return source, filename.rsplit(".", 1)[0]
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, filename)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {filename} not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data, path
