"""Executables compiled ahead of a run (compile-check's `--save_compiled`), and a run taking them back
(`train-stage2 --compiled_dir`), so that a job on rented chips need not spend minutes compiling.

A folder holds one pickle per program (`jax.experimental.serialize_executable`: the payload and its argument and
output trees) and `index.json` naming them, each with the hash of its lowered program (`program_hash`). A run
lowers its own programs anyway (cheap next to compiling) and takes a saved executable only where its lowering
hashes the same: the same computation, shapes and shardings, whatever flags produced it; anything else compiles
as usual. Loading needs the JAX version (and platform) that compiled it.
"""
from __future__ import annotations

import hashlib
import json
import pickle
from typing import Any, Sequence

import jax

from cogstream_jax.errors import ConfigError

INDEX = "index.json"


def program_hash(lowered: Any) -> str:
    """sha256 of a lowered program's text (no source locations, so the same in any process)."""
    return hashlib.sha256(lowered.as_text().encode()).hexdigest()


def save(folder: str, reports: Sequence[Any]) -> None:
    """Serialise each report's executable beside `index.json`; each file is written atomically (a local rename,
    or one upload to a gs:// URL)."""
    from jax.experimental import serialize_executable

    from cogstream_jax.io_utils import as_path, atomic_write_bytes, atomic_write_json

    out = as_path(folder)
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for i, r in enumerate(reports):
        if r.executable is None:  # XLA refused it
            continue
        payload, in_tree, out_tree = serialize_executable.serialize(r.executable)
        path = out / f"{i:02d}_{r.name}.pkl"
        atomic_write_bytes(path, pickle.dumps((payload, in_tree, out_tree)))
        index.append({"name": r.name, "label": r.label, "file": path.name,
                      "program_sha256": getattr(r, "program_sha256", None)})
    atomic_write_json(out / INDEX, {"jax": jax.__version__, "programs": index})


def load(folder: str, name: str, flag: str = "--compiled_dir") -> dict[str, tuple[str, Any]]:
    """The programs named `name` in a saved folder, loaded onto this process's devices: program hash -> (file,
    executable). A folder that is not one, or a program this JAX cannot load, is a one-line error naming it."""
    from jax.experimental import serialize_executable

    from cogstream_jax.io_utils import as_path

    root = as_path(folder)
    if not (root / INDEX).is_file():
        raise ConfigError(f"{flag} {folder}: no {INDEX} (a folder written by compile-check --save_compiled)")
    try:
        index = json.loads((root / INDEX).read_text())
        programs = [p for p in index["programs"] if p["name"] == name and p.get("program_sha256")]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{flag} {folder}: {INDEX} is not compile-check's index ({e!r})") from None
    if index.get("jax") != jax.__version__:
        raise ConfigError(f"{flag} {folder}: compiled with JAX {index.get('jax')}, this is JAX {jax.__version__}")
    loaded = {}
    for p in programs:
        try:
            payload, in_tree, out_tree = pickle.loads((root / p["file"]).read_bytes())
            executable = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
        except Exception as e:  # noqa: BLE001 - another platform, a damaged file: say which, stop
            raise ConfigError(f"{flag} {folder}: {p['file']} cannot be loaded here: "
                              f"{(str(e).strip().splitlines() or [repr(e)])[0][:200]}") from None
        loaded[p["program_sha256"]] = (p["file"], executable)
    return loaded
