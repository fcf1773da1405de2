"""Executables compiled ahead of a run (compile-check's `--save_compiled`), and a run taking them back
(`train-stage1/2 --compiled_dir`), so that a job on rented chips need not spend minutes compiling.

A folder holds one pickle per program (`jax.experimental.serialize_executable`: the payload and its argument and
output trees) and `index.json` naming them, each with the hash of its lowered program (`program_hash`) and the
kinds of the devices it runs on, beside the JAX version and the compiler settings of the environment (XLA_FLAGS,
LIBTPU_INIT_ARGS), which a lowered program does not show. A run lowers its own programs anyway (cheap next to
compiling) and takes a saved executable only where its lowering hashes the same (the same computation, shapes and
shardings, whatever flags produced it), on devices of the same kinds and count, with the same argument tree;
anything else compiles as usual.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import sys
from typing import Any, Mapping, Sequence

import jax

from cogstream_jax import persistent_cache
from cogstream_jax.compile_log import CompileLog
from cogstream_jax.errors import ConfigError, first_line

INDEX = "index.json"


def program_hash(lowered: Any) -> str:
    """sha256 of a lowered program's text (no source locations, so the same in any process)."""
    return hashlib.sha256(lowered.as_text().encode()).hexdigest()


def save(folder: str, reports: Sequence[Any]) -> None:
    """Serialise each report's executable beside `index.json`; each file is written atomically (a local rename,
    or one upload to a gs:// URL). The executables must have been compiled, not read back from JAX's persistent
    cache: a CPU executable read back serialises without its code (checked; compile-check compiles with the
    cache off, in a process of its own)."""
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
        devices = _program_devices(r.executable)
        index.append({"name": r.name, "label": r.label, "file": path.name,
                      "program_sha256": getattr(r, "program_sha256", None), "devices": _kinds(devices),
                      "device_ids": _ids(devices)})
    atomic_write_json(out / INDEX, {"jax": jax.__version__, "compiler_flags": compiler_flags(), "programs": index})


def compiler_flags() -> dict[str, str]:
    """The environment's compiler settings, which a lowered program does not show (the host's fake device count
    left out: it only says how many CPU devices exist)."""
    import os
    import re

    xla = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", "")).split()
    return {"XLA_FLAGS": " ".join(sorted(xla)), "LIBTPU_INIT_ARGS": os.environ.get("LIBTPU_INIT_ARGS", "")}


def _kinds(devices) -> list[str]:
    return [f"{d.platform}:{d.device_kind}" for d in devices]


def _ids(devices) -> list[int]:
    return [int(d.id) for d in devices]


def _program_devices(executable: Any) -> list:
    """The devices a program runs on, in its mesh's order (which a lowered program does not show): their kinds and
    ids must be a run's, in the same order (a TPU slice's compile-only devices carry the slice's ids)."""
    shardings = jax.tree.leaves(executable.input_shardings)
    mesh = getattr(shardings[0], "mesh", None) if shardings else None
    return list(mesh.devices.flat) if mesh is not None else sorted(shardings[0].device_set, key=lambda d: d.id)


def load(folder: str, name: str, mesh, flag: str = "--compiled_dir") -> dict[str, tuple[str, Any]]:
    """The programs named `name` in a saved folder that run on devices of `mesh`'s kinds and count, loaded onto
    them: program hash -> (file, executable). A folder that is not one, of another JAX or other compiler
    settings, or a program this runtime cannot load, is a one-line error naming it."""
    from jax.experimental import serialize_executable

    from cogstream_jax.io_utils import as_path

    root = as_path(folder)
    if not (root / INDEX).is_file():
        raise ConfigError(f"{flag} {folder}: no {INDEX} (a folder written by compile-check --save_compiled)")
    try:
        index = json.loads((root / INDEX).read_text())
        programs = [(str(p["file"]), str(p["program_sha256"]), list(p["devices"]),
                     None if p.get("device_ids") is None else [int(i) for i in p["device_ids"]])
                    for p in index["programs"] if p["name"] == name and p.get("program_sha256")]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{flag} {folder}: {INDEX} is not compile-check's index ({e!r})") from None
    if index.get("jax") != jax.__version__:
        raise ConfigError(f"{flag} {folder}: compiled with JAX {index.get('jax')}, this is JAX {jax.__version__}")
    if index.get("compiler_flags") != compiler_flags():
        raise ConfigError(f"{flag} {folder}: compiled with other compiler settings ({index.get('compiler_flags')}, "
                          f"here {compiler_flags()}); run compile-check with this run's XLA_FLAGS/LIBTPU_INIT_ARGS")
    here, here_ids = _kinds(mesh.devices.flat), _ids(mesh.devices.flat)
    loaded = {}
    for file, digest, devices, ids in programs:
        if devices != here:  # another chip, or another device count
            print(f"note: {flag}: {file} runs on {len(devices)} x {sorted(set(devices))}, this run's mesh on "
                  f"{len(here)} x {sorted(set(here))}: not taken", file=sys.stderr)
            continue
        if ids is not None and ids != here_ids:  # another device order, or the ids of another process layout
            print(f"note: {flag}: {file} was compiled for devices {_short(ids)} in this order, this run's mesh has "
                  f"{_short(here_ids)}: not taken", file=sys.stderr)
            continue
        try:
            payload, in_tree, out_tree = pickle.loads((root / file).read_bytes())
            executable = serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                                  execution_devices=list(mesh.devices.flat))
        except Exception as e:  # noqa: BLE001 - a damaged file, a runtime that refuses it: say which, stop
            raise ConfigError(f"{flag} {folder}: {file} cannot be loaded here: {first_line(e)}") from None
        loaded[digest] = (file, executable)
    return loaded


def _short(ids: Sequence[int]) -> str:
    """Device ids for a one-line note: a long list is cut (a pod has hundreds)."""
    return str(ids) if len(ids) <= 8 else f"[{', '.join(map(str, ids[:8]))}, ... ({len(ids)})]"


def take(saved: Mapping[str, tuple[str, Any]] | None, lowered: Any, since: int) -> Any | None:
    """The executable of `saved` (`load`) whose program is `lowered`'s, over the same argument tree, or None.
    A taken program leaves the active compile log (`since`: `CompileLog.mark()` before lowering it)."""
    ahead = saved.get(program_hash(lowered)) if saved else None
    if ahead is None:
        return None
    if ahead[1].in_tree != lowered.in_tree:  # the same program over another pytree
        print(f"note: {ahead[0]} takes its arguments as another tree: compiling instead", file=sys.stderr)
        return None
    CompileLog.not_compiled(since=since)
    return Taken(*ahead)


class Taken:
    """A saved executable in a run. One that this runtime loads but cannot run (a program for another runtime,
    or one serialised without its code) fails at its first call: a one-line error naming its file, not a
    traceback in the middle of the first update."""

    def __init__(self, file: str, executable: Any):
        self.file, self.executable, self._ran = file, executable, False

    def __call__(self, *args):
        if self._ran:
            return self.executable(*args)
        try:
            out = jax.block_until_ready(self.executable(*args))  # once: errors of the first run surface here
        except jax.errors.JaxRuntimeError as e:
            raise ConfigError(f"--compiled_dir: {self.file} fails at its first run here ({first_line(e)}); if the "
                              "saved program is at fault (another runtime, no code), compile-check --save_compiled "
                              "again on this runtime or run without --compiled_dir") from None
        self._ran = True
        return out


class ByShape:
    """A jitted function called through one executable per argument shape: each new shape is lowered once, then
    takes the saved executable of the same program (`take`) or compiles. Arguments must carry the shardings the
    program expects (an executable does not move them)."""

    def __init__(self, jitted: Any, saved: Mapping[str, tuple[str, Any]]):
        self.jitted, self.saved = jitted, dict(saved)
        self.taken: set[str] = set()  # files of the executables taken
        self.compiled = 0
        self.read_back = 0  # from JAX's persistent compilation cache (`--compilation_cache_dir`)
        self._executables: dict[tuple, Any] = {}

    def __call__(self, *args):
        leaves, tree = jax.tree.flatten(args)
        key = (tree,) + tuple((tuple(x.shape), str(x.dtype)) for x in leaves)
        run = self._executables.get(key)
        if run is None:
            mark = CompileLog.mark()
            lowered = self.jitted.lower(*args)
            run = take(self.saved, lowered, since=mark)
            if run is None:
                before = persistent_cache.reads()
                run = lowered.compile()
                if persistent_cache.reads() > before:
                    self.read_back += 1
                else:
                    self.compiled += 1
            else:
                self.taken.add(run.file)
            self._executables[key] = run
        return run(*args)

    def summary(self) -> str:
        return f"{ahead_text(len(self.taken), len(self.saved), self.read_back)}{self.compiled} compiled"


def ahead_text(taken: int, there: int | None, read_back: int) -> str:
    """What a run did not compile, as the start of its report ("" if nothing): executables taken from
    --compiled_dir (`there`: the programs the folder had for it; None: no folder) and programs read back from
    JAX's persistent compilation cache."""
    parts = [] if there is None else [f"{taken} taken from --compiled_dir (of {there} there)"]
    parts += [f"{read_back} read back from the compilation cache"] if read_back else []
    return "".join(f"{part}, " for part in parts)
