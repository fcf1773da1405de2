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
from typing import Iterator

import jax

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


_active: CacheUse | None = None
_listening = False


def _count(event: str, **kwargs) -> None:
    use = _active
    if use is None:
        return
    if event == _REQUEST:
        use.requests += 1
    elif event == _HIT:
        use.read_back += 1
    elif event == _WRITE:
        use.written += 1


def reads() -> int:
    """Programs read back from the cache so far in the active `using` block (0 outside one): a caller compares the
    count before and after a compile to tell a read from a compile."""
    use = _active
    return use.read_back if use is not None else 0


def add_compilation_cache_flag(parser) -> None:
    """`--compilation_cache_dir` (and its hyphenated alias) on a run's parser."""
    parser.add_argument("--compilation_cache_dir", "--compilation-cache-dir", dest="compilation_cache_dir",
                        default=None,
                        help="JAX's persistent compilation cache (a folder or gs:// URL, trusted: it holds "
                             "executables): programs compiled by an earlier run of the same programs on the same "
                             "kind of devices are read back instead of compiled; process 0 writes those that took "
                             "over a second (default: JAX_COMPILATION_CACHE_DIR, else no cache)")


@contextlib.contextmanager
def using(path: str | None, flag: str = "--compilation_cache_dir", report: bool = True) -> Iterator[CacheUse | None]:
    """JAX's persistent compilation cache in `path` while the block runs (None: the cache as the environment set
    it, e.g. JAX_COMPILATION_CACHE_DIR). A folder that cannot be written is a one-line error before anything
    compiles. `report`: process 0 prints its reads and compiles when the block ends without an error."""
    global _active, _listening
    if path is None:
        yield None
        return
    from jax.experimental.compilation_cache import compilation_cache

    from cogstream_jax.errors import ConfigError
    from cogstream_jax.io_utils import check_writable

    if not jax.config.jax_enable_compilation_cache:
        raise ConfigError(f"{flag} {path}: JAX's compilation cache is disabled here (JAX_ENABLE_COMPILATION_CACHE)")
    try:  # every process (nothing here may start JAX's backends: multi-host runs initialise them later)
        check_writable(path)
    except ConfigError as e:
        raise ConfigError(f"{flag}: {e}") from None
    if not _listening:
        jax.monitoring.register_event_listener(_count)
        _listening = True
    previous = jax.config.jax_compilation_cache_dir
    use = CacheUse(str(path))
    jax.config.update("jax_compilation_cache_dir", str(path))
    compilation_cache.reset_cache()  # the cache opens its folder once: at the next compile, this one
    _active = use
    try:
        yield use
    finally:
        _active = None
        jax.config.update("jax_compilation_cache_dir", previous)
        compilation_cache.reset_cache()
    if report and jax.process_index() == 0:  # after a run that ended well (its backends are up by then)
        print(use.summary(), file=sys.stderr)
