"""Which XLA programs a piece of code compiles: name, argument bytes, seconds.

JAX reports every backend compilation through `jax.monitoring` (event `/jax/core/compile/backend_compile_duration`
with the program's name) and logs "Compiling <name> with global shapes and types <avals>" just before lowering
it to XLA (its arguments there are the ones the program uses: jit drops unused inputs). `CompileLog` listens to
both while it is active, so a run can count its model-sized programs (those that take a tower's weight
matrices) and tests can compare a real run with compile-check. A program that JAX's persistent compilation cache
(`persistent_cache`) serves is lowered (and logged) but not compiled: the cache's hit message lists it in
`read_back` too, and its time (reading it back) is not compile time.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time

import jax
import numpy as np

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_PXLA_LOGGER = "jax._src.interpreters.pxla"
_COMPILER_LOGGER = "jax._src.compiler"  # "Persistent compilation cache hit for '<module>' ..."
_LOGGERS = (_PXLA_LOGGER, _COMPILER_LOGGER)


@dataclasses.dataclass
class CompiledProgram:
    name: str  # the jitted function's name (without jax's "jit" wrapper)
    argument_bytes: int
    argument_shapes: tuple[tuple[int, ...], ...]
    seconds: float = 0.0
    ended: float = 0.0  # time.perf_counter() when its backend compile finished
    from_cache: bool = False  # read back from the persistent compilation cache, not compiled


def program_name(module_name: str) -> str:
    """'jit(step)' / 'jit_step' -> 'step'."""
    if module_name.startswith("jit(") and module_name.endswith(")"):
        return module_name[4:-1]
    return module_name[4:] if module_name.startswith("jit_") else module_name


def _aval_bytes(aval) -> int:
    shape, dtype = getattr(aval, "shape", None), getattr(aval, "dtype", None)
    if shape is None or dtype is None:
        return 0
    try:
        return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    except TypeError:  # extended dtypes (PRNG keys)
        return 0


class CompileLog:
    """Context manager: `programs` lists what was compiled (in order) while it was active.

    Only one log can be active at a time in a process (it installs process-wide hooks)."""

    _active: "CompileLog | None" = None
    _lock = threading.Lock()

    def __init__(self):
        self.programs: list[CompiledProgram] = []  # each program the code needed, compiled or read back
        self._pending: dict[str, list[CompiledProgram]] = {}
        self._hit = threading.local()  # a cache hit was logged in this thread, its duration event not yet seen

    # -- hooks
    def _filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("Compiling %s with global shapes") and len(record.args or ()) >= 2:
            name = program_name(str(record.args[0]))
            avals = record.args[1]
            entry = CompiledProgram(name, sum(_aval_bytes(a) for a in avals),
                                    tuple(tuple(getattr(a, "shape", ())) for a in avals))
            self.programs.append(entry)
            self._pending.setdefault(name, []).append(entry)
        elif msg.startswith("Persistent compilation cache hit for"):
            self._hit.now = True  # the duration event this thread records next is that program's (`_on_duration`)
        # records below the level the logger had are not for anyone else
        return record.levelno >= self._levels.get(record.name, logging.WARNING)

    def _on_duration(self, event: str, duration: float, **kwargs) -> None:
        if event != _BACKEND_COMPILE_EVENT or CompileLog._active is not self:
            return
        waiting = self._pending.get(program_name(str(kwargs.get("fun_name", ""))))
        if waiting:
            entry = waiting.pop(0)
            entry.seconds, entry.ended = duration, time.perf_counter()
            entry.from_cache = getattr(self._hit, "now", False)
        self._hit.now = False

    @classmethod
    def mark(cls) -> int:
        """Where the active log is now (for `not_compiled`)."""
        return len(cls._active.programs) if cls._active is not None else 0

    @classmethod
    def not_compiled(cls, since: int) -> None:
        """The programs lowered since `mark()` returned `since` will not be compiled: a run took executables
        compiled ahead for them (`compiled_store`), so they are not among the active log's programs."""
        active = cls._active
        if active is None:
            return
        dropped = active.programs[since:]
        active.programs = active.programs[:since]
        for waiting in active._pending.values():
            waiting[:] = [p for p in waiting if all(p is not d for d in dropped)]

    def __enter__(self) -> "CompileLog":
        with CompileLog._lock:
            if CompileLog._active is not None:
                raise RuntimeError("another CompileLog is already active")
            CompileLog._active = self
        self._levels, self._saved_levels = {}, {}
        for name in _LOGGERS:
            logger = logging.getLogger(name)
            self._levels[name], self._saved_levels[name] = logger.getEffectiveLevel(), logger.level
            logger.setLevel(logging.DEBUG)
            logger.addFilter(self._filter)
        if not getattr(CompileLog, "_listener_installed", False):
            jax.monitoring.register_event_duration_secs_listener(_dispatch_duration)
            CompileLog._listener_installed = True
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        for name in _LOGGERS:
            logger = logging.getLogger(name)
            logger.removeFilter(self._filter)
            logger.setLevel(self._saved_levels[name])
        with CompileLog._lock:
            CompileLog._active = None

    # -- queries
    def model_sized(self, *towers) -> list[CompiledProgram]:
        """Programs that take at least half of the weight matrices of one of `towers` (model parts' parameters,
        e.g. the vision encoder's and the LLM's states; matched by shape): model passes, not weight initialisers
        (one array each) nor optimiser updates (LoRA-shaped arrays only)."""
        def uses(program: CompiledProgram, tower) -> bool:
            matrices = [tuple(x.shape) for x in jax.tree.leaves(tower) if len(x.shape) >= 2]
            wanted = set(matrices)
            return sum(s in wanted for s in program.argument_shapes) >= max(1, len(matrices) // 2)

        return [p for p in self.programs if any(uses(p, t) for t in towers)]

    @property
    def read_back(self) -> list[CompiledProgram]:
        """The programs read from the persistent compilation cache."""
        return [p for p in self.programs if p.from_cache]

    @property
    def compile_seconds(self) -> float:
        """Wall time spent compiling: programs compiled at the same time (`Stage2Device.precompile`) count once,
        programs read back from the persistent cache not at all."""
        spans = sorted((p.ended - p.seconds, p.ended) for p in self.programs if p.seconds > 0 and not p.from_cache)
        total, reach = 0.0, float("-inf")
        for start, end in spans:
            if end > reach:
                total += end - max(start, reach)
                reach = end
        return total


def _dispatch_duration(event: str, duration: float, **kwargs) -> None:
    active = CompileLog._active
    if active is not None:
        active._on_duration(event, duration, **kwargs)


def tree_bytes(tree) -> int:
    """Bytes of every array (or ShapeDtypeStruct) leaf of a pytree."""
    return sum(_aval_bytes(leaf) for leaf in jax.tree.leaves(tree))
