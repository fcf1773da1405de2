"""Paths that may be URLs, and atomic file writes: a crash or a full disk never leaves a half-written file
(report, result, config, cache entry, index) behind.

Every folder or file a user names may be a local path or an object-store URL (`gs://bucket/run`, `s3://...`):
`as_path` keeps URLs as `etils.epath.Path` (the path library orbax uses; gcsfs / s3fs behind it) and makes local
paths absolute. Atomicity: locally a temp file is renamed over the target; on an object store one object is
written with one upload, which readers see whole or not at all (there is no rename there, so folders made of
several objects are committed by writing their marker file last; see adapter_io).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from cogstream_jax.errors import ConfigError


#: URL schemes `as_path` accepts (fsspec/epath backends; orbax's TensorStore checkpoints support gs://)
URL_SCHEMES = ("gs", "s3")
_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")


def is_url(path: Any) -> bool:
    return isinstance(path, str) and _URL_RE.match(path) is not None or type(path).__module__.startswith("etils")


def as_path(path: Any) -> Any:
    """A URL (`gs://bucket/folder`) as an `etils.epath.Path` (validated: known scheme, a bucket), anything else as
    an absolute `pathlib.Path`. An epath.Path passes through."""
    if type(path).__module__.startswith("etils"):
        return path
    text = os.fspath(path)
    match = _URL_RE.match(text)
    if match is None:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/[^/]", text):  # gs:/bucket (one slash): a typo, not a local path
            raise ConfigError(f"{text}: malformed URL (expected scheme://bucket/path)")
        return Path(text).absolute()
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme not in URL_SCHEMES:
        raise ConfigError(f"{text}: unsupported URL scheme {scheme!r} (supported: "
                          f"{', '.join(s + '://' for s in URL_SCHEMES)})")
    bucket = rest.split("/", 1)[0]
    if not bucket or not re.fullmatch(r"[A-Za-z0-9._-]+", bucket):
        raise ConfigError(f"{text}: malformed URL (no valid bucket name after {scheme}://)")
    from etils import epath

    return epath.Path(text.rstrip("/") if len(rest) > len(bucket) + 1 else text)


def as_given(path: Any) -> Any:
    """`as_path`, except that a local path stays as the user gave it (relative stays relative, so reports and
    messages name inputs as given); URLs are validated the same way."""
    checked = as_path(path)
    return checked if is_url(checked) else Path(path)


def check_orbax_folder(folder: Any) -> None:
    """orbax-checkpoint 0.12 writes arrays through TensorStore with gs:// as its only object store (an s3:// path
    fails its absolute-path check only when the first checkpoint is saved): refuse s3:// before any work."""
    if is_url(folder) and str(folder).lower().startswith("s3://"):
        raise ConfigError(f"{folder}: orbax checkpoints cannot be written to s3:// (orbax-checkpoint 0.12 supports "
                          "gs:// and local or mounted folders)")


def check_writable(folder: Any, orbax: bool = False) -> None:
    """Create `folder` and write/delete a probe file there: an unwritable folder or bucket is a ConfigError now,
    not a failure at the first checkpoint. `orbax`: the folder will hold orbax checkpoints."""
    if orbax:
        check_orbax_folder(folder)
    path = as_path(folder)
    probe = path / f".cogstream-write-probe-{os.getpid()}-{os.urandom(4).hex()}"  # unique across hosts too
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except Exception as exc:  # OSError locally; assorted HTTP errors from object-store clients
        raise ConfigError(f"{path}: cannot write there ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
                          ) from None


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write to a temp file in the target folder, then os.replace it over `path` (an object store: one upload)."""
    if is_url(path):
        path = as_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return
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
    if as_path(path).is_dir():  # a local path or a URL (as_path keeps gs:// a URL)
        path = os.path.join(path, filename)
    try:
        with as_path(path).open("r") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {filename} not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data, path
