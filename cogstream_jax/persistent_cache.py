"""JAX's persistent compilation cache for a run (`--compilation_cache_dir DIR`, a folder or a gs:// URL): what one
run compiles, a later run of the same programs reads back instead of compiling again (a resumed or restarted
training job, the next evaluation).

JAX keys each entry by the program, its compile options and devices, and the JAX/XLA versions, so runs of any
flags may share a folder: an entry is only taken by the same program on the same kind of devices. Only process 0
writes (JAX's rule: no write contention on object stores). Programs that compile in under a second are not kept
(JAX's default; `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` changes it). The folder is trusted: its entries are
executables, so whoever can write it can run code in the jobs that use it.

Unlike `--compiled_dir` (executables compiled ahead on another machine by compile-check) the cache serves every
program, eval's included, but only after some run on this kind of hardware has compiled it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
from typing import Any, Callable, Iterator

import jax

FLAG = "--compilation_cache_dir"
_REQUEST = "/jax/compilation_cache/compile_requests_use_cache"  # a program to compile or read back
_HIT = "/jax/compilation_cache/cache_hits"  # read back
_WRITE = "/jax/compilation_cache/cache_misses"  # JAX records it when it writes an entry


@dataclasses.dataclass
class CacheUse:
    """How a run used the cache: programs read back, compiled, and written (those compiled slowly enough)."""

    path: str
    requests: int = 0
    read_back: int = 0
    written: int = 0

    @property
    def compiled(self) -> int:
        return self.requests - self.read_back

    def summary(self) -> str:
        return (f"compilation cache {self.path}: {self.read_back} programs read back, {self.compiled} compiled "
                f"({self.written} written)")


_totals = CacheUse("")  # this process's, whoever turned the cache on (a flag, JAX_COMPILATION_CACHE_DIR)
_lock = threading.Lock()  # compiles run in several threads (`Stage2Device.precompile`, eval streams)
_FIELDS = {_REQUEST: "requests", _HIT: "read_back", _WRITE: "written"}


def _count(event: str, **kwargs) -> None:
    field = _FIELDS.get(event)
    if field is not None:
        with _lock:
            setattr(_totals, field, getattr(_totals, field) + 1)


jax.monitoring.register_event_listener(_count)


def reads() -> int:
    """Programs this process has read back from the cache so far: a caller compares the count before and after a
    compile to tell a read from a compile."""
    return _totals.read_back


def add_compilation_cache_flag(parser) -> None:
    """`--compilation_cache_dir` (and its hyphenated alias) on a run's parser."""
    parser.add_argument(FLAG, FLAG.replace("_", "-"), dest=FLAG[2:],
                        default=None,
                        help="JAX's persistent compilation cache (a folder or gs:// URL, trusted: it holds "
                             "executables): programs compiled by an earlier run of the same programs on the same "
                             "kind of devices are read back instead of compiled; process 0 writes those that took "
                             "a second or more (default: JAX_COMPILATION_CACHE_DIR, else no cache)")


@contextlib.contextmanager
def configured(**settings: Any) -> Iterator[None]:
    """JAX config `settings` that concern the cache while the block runs, then the previous values. JAX opens the
    cache (or decides not to) once per process, so it is reset on the way in and out."""
    from jax.experimental.compilation_cache import compilation_cache

    previous = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


@contextlib.contextmanager
def using(path: str | None) -> Iterator[CacheUse | None]:
    """JAX's persistent compilation cache in `path` (`--compilation_cache_dir`) while the block runs (None: the
    cache as the environment set it, e.g. JAX_COMPILATION_CACHE_DIR). A folder that cannot be written is a
    one-line error before anything compiles. Process 0 prints the block's reads and compiles when it ends without
    an error."""
    if path is None:
        yield None
        return
    from cogstream_jax.errors import ConfigError
    from cogstream_jax.io_utils import check_writable, is_url

    if not jax.config.jax_enable_compilation_cache:
        raise ConfigError(f"{FLAG} {path}: JAX's compilation cache is disabled here (JAX_ENABLE_COMPILATION_CACHE)")
    try:  # every process (nothing here may start JAX's backends: multi-host runs initialise them later)
        check_writable(path)
    except ConfigError as e:
        raise ConfigError(f"{FLAG}: {e}") from None
    settings: dict[str, Any] = {"jax_compilation_cache_dir": str(path)}
    if is_url(path):  # XLA's own GPU caches (autotuning) go under the folder as a local path: gs:/bucket/...
        settings["jax_persistent_cache_enable_xla_caches"] = "none"
    start = dataclasses.replace(_totals)
    use = CacheUse(str(path))
    with configured(**settings):
        yield use
    for field in _FIELDS.values():  # the block's share of the process's counts
        setattr(use, field, getattr(_totals, field) - getattr(start, field))
    if jax.process_index() == 0:  # after a run that ended well (its backends are up by then)
        print(use.summary(), file=sys.stderr)


def wrap(path: str | None, body: Callable[[], Any]) -> Callable[[], Any]:
    """`body` run inside `using(path)` (for `cli_utils.run_cli`, whose one-line errors cover the cache's)."""
    def run() -> Any:
        with using(path):
            return body()

    return run
