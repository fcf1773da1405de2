"""The bundled VideoLLaMA3 tokenizer and configs (package data), unpacked into a cache folder on first use.

The tiny demo model keeps the real vocabulary and special token ids, so the real tokenizer works with it and
nothing needs a network.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import pathlib
import shutil
import tempfile
from importlib import resources

_ASSET = "assets/videollama3"


def _cache_root() -> pathlib.Path:
    base = os.environ.get("COGSTREAM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cogstream_jax")
    return pathlib.Path(base)


@functools.lru_cache(maxsize=1)
def _bundled_files() -> tuple[tuple[str, ...], str]:
    """The bundled asset names and a digest of their bytes (hashed once per process)."""
    src = resources.files("cogstream_jax").joinpath(_ASSET)
    files = tuple(sorted(p.name for p in src.iterdir() if p.name != "README.md"))
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode())
        digest.update(src.joinpath(name).read_bytes())
    return files, digest.hexdigest()[:12]


def bundled_model_dir() -> pathlib.Path:
    """A folder with config.json, tokenizer files and processor configs of VideoLLaMA3-7B (no weights)."""
    src = resources.files("cogstream_jax").joinpath(_ASSET)
    files, digest = _bundled_files()
    target = _cache_root() / f"videollama3-{digest}"
    if (target / "vocab.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=".unpack-"))
    try:
        for name in files:
            data = src.joinpath(name).read_bytes()
            if name.endswith(".gz"):
                name, data = name[:-3], gzip.decompress(data)
            (tmp / name).write_bytes(data)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
