"""File operations on string paths that may be object-store URLs (`gs://bucket/...`), for code that reads
checkpoints, configs and videos by path.

Local paths go to `os` as before; URLs go through `etils.epath` (gcsfs / s3fs). Libraries that only read local
files (PyAV/decord for video, transformers for the tokenizer) get a local copy: `local_file` downloads one object
into a per-process scratch folder bounded by `COGSTREAM_REMOTE_CACHE_BYTES` (default 4 GiB, least recently used
copies deleted first), `local_folder` copies the named small files of a folder once per process.
"""
from __future__ import annotations

import atexit
import collections
import hashlib
import os
import shutil
import tempfile
import threading
from typing import IO, Iterable

from cogstream_jax.io_utils import as_path, is_url

_CACHE_BYTES = int(os.environ.get("COGSTREAM_REMOTE_CACHE_BYTES", 4 << 30))
_lock = threading.Lock()
_scratch: str | None = None
_files: collections.OrderedDict[str, tuple[str, int]] = collections.OrderedDict()  # url -> (local copy, bytes)
_folders: dict[tuple[str, tuple[str, ...]], str] = {}


def isdir(path) -> bool:
    return as_path(path).is_dir() if is_url(path) else os.path.isdir(path)


def isfile(path) -> bool:
    return as_path(path).is_file() if is_url(path) else os.path.isfile(path)


def exists(path) -> bool:
    return as_path(path).exists() if is_url(path) else os.path.exists(path)


def getsize(path) -> int:
    return int(as_path(path).stat().length) if is_url(path) else os.path.getsize(path)


def size_and_mtime(path) -> tuple[int, int]:
    """(bytes, modification time in ns): what tells two versions of a file apart (os.stat's st_mtime_ns locally,
    so keys and signatures made from it before URLs were supported stay the same)."""
    if is_url(path):
        stat = as_path(path).stat()
        return int(stat.length), int((stat.mtime or 0) * 1e9)
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def listdir(path) -> list[str]:
    return sorted(p.name for p in as_path(path).iterdir()) if is_url(path) else sorted(os.listdir(path))


def open_file(path, mode: str = "rb") -> IO:
    """A file object (seekable for reading) for a local path or a URL."""
    return as_path(path).open(mode) if is_url(path) else open(path, mode)


def absolute(path) -> str:
    """`os.path.abspath` for local paths; a URL stays a URL (abspath would make `gs:/bucket` under the cwd)."""
    return str(as_path(path)) if is_url(path) else os.path.abspath(os.fspath(path))


def _scratch_dir() -> str:
    global _scratch
    if _scratch is None:
        _scratch = tempfile.mkdtemp(prefix="cogstream-remote-")
        atexit.register(shutil.rmtree, _scratch, True)
    return _scratch


def local_file(path) -> str:
    """A local path with the contents of `path`: itself when local, else a downloaded copy (kept while it is
    among the most recently used copies that fit the cache bound)."""
    if not is_url(path):
        return os.fspath(path)
    url = str(as_path(path))
    with _lock:
        hit = _files.get(url)
        if hit is not None and os.path.exists(hit[0]):
            _files.move_to_end(url)
            return hit[0]
        name = hashlib.sha1(url.encode()).hexdigest()[:16] + "-" + url.rsplit("/", 1)[-1]
        target = os.path.join(_scratch_dir(), name)
        fd, tmp = tempfile.mkstemp(dir=_scratch_dir(), suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, as_path(url).open("rb") as src:
                shutil.copyfileobj(src, out, 8 << 20)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        _files[url] = (target, os.path.getsize(target))
        _evict(keep=url)
        return target


def _evict(keep: str) -> None:
    total = sum(size for _, size in _files.values())
    for url in list(_files):
        if total <= _CACHE_BYTES or url == keep:
            break
        local, size = _files.pop(url)
        if os.path.exists(local):
            os.unlink(local)
        total -= size


def local_folder(path, names: Iterable[str]) -> str:
    """A local folder holding those of `names` that exist in folder `path` (itself when local)."""
    if not is_url(path):
        return os.fspath(path)
    key = (str(as_path(path)), tuple(names))
    with _lock:
        if key in _folders:
            return _folders[key]
        folder = tempfile.mkdtemp(prefix="folder-", dir=_scratch_dir())
        for name in key[1]:
            src = as_path(key[0]) / name
            if src.is_file():
                with open(os.path.join(folder, name), "wb") as out:
                    out.write(src.read_bytes())
        _folders[key] = folder
        return folder
