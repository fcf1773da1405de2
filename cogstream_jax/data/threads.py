"""A small thread-pool helper for the host-side video work (decoding, PIL resize, patchify).

libavcodec and PIL release the GIL while they work, so threads give real parallelism there without the
start-up and pickling costs of processes. Results never depend on the thread count: every task computes a
fixed part of the output.
"""
from __future__ import annotations

import collections
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Sequence, TypeVar

from cogstream_jax.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")

MAX_DEFAULT_THREADS = 8


def usable_cores() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """Cores this process may use, capped at 8 (more rarely helps a single clip)."""
    return max(1, min(MAX_DEFAULT_THREADS, usable_cores()))


MAX_DEFAULT_WORKERS = 4
CORES_PER_WORKER = 4


def prep_workers(workers: int | None) -> int:
    """Items (stage-2 QAs) prepared at once: `None` -> a quarter of the usable cores, 1 to 4 (each item's decoding
    and resizing also runs on up to `default_threads()` threads of its own); otherwise a positive count."""
    if workers is None:
        return max(1, min(MAX_DEFAULT_WORKERS, usable_cores() // CORES_PER_WORKER))
    try:
        return resolve_threads(workers)
    except ValueError:
        raise ConfigError(f"--prep_workers: expected a positive integer, got {workers!r}") from None


def resolve_threads(threads: int | None) -> int:
    """`None` -> `default_threads()`; otherwise a positive count."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected a positive integer or None, got {threads!r}")
    return threads


def thread_map(fn: Callable[[T], R], items: Iterable[T], threads: int) -> list[R]:
    """`[fn(x) for x in items]`, run on up to `threads` threads; exceptions propagate as raised."""
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


def even_chunks(count: int, parts: int) -> list[range]:
    """`range(count)` cut into at most `parts` contiguous, non-empty pieces of near-equal size."""
    parts = max(1, min(parts, count))
    bounds = [count * k // parts for k in range(parts + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def balanced_groups(costs: Sequence[float], parts: int) -> list[range]:
    """Cut a sequence into at most `parts` contiguous groups of near-equal total cost."""
    total = float(sum(costs))
    if parts <= 1 or len(costs) <= 1 or total <= 0:
        return [range(len(costs))] if costs else []
    groups, start, running = [], 0, 0.0
    for k, cost in enumerate(costs):
        running += cost
        if running >= total * (len(groups) + 1) / parts and k + 1 < len(costs) and len(groups) + 1 < parts:
            groups.append(range(start, k + 1))
            start = k + 1
    groups.append(range(start, len(costs)))
    return groups


class OrderedMap:
    """`fn(x)` for each x of `items`, taken in order, computed on `workers` threads up to `ahead` items before they
    are taken (0: each one when it is taken, on the caller's thread).

    Items are pulled from `items` on the caller's thread, at the start and each time one is taken; an error of
    `items` itself reaches the caller after the results before it, an error of `fn` when its result is taken. The
    results are those of `[fn(x) for x in items]` whatever the worker count, as long as `fn` of one item does not
    depend on another's (a stage-2 QA's host preparation, say). The workers are daemon threads, so a process that
    stops (an error, Ctrl-C) never waits for an item still being computed."""

    def __init__(self, fn: Callable[[T], R], items: Iterable[T], *, workers: int, ahead: int):
        self._fn, self._items, self._ahead = fn, iter(items), max(0, ahead)
        self._jobs: collections.deque[Future] = collections.deque()
        self._ended: BaseException | None = None  # StopIteration or the error `items` raised
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, daemon=True, name="ordered-map")
                         for _ in range(max(1, workers) if self._ahead else 0)]
        for thread in self._threads:
            thread.start()
        self._top_up()  # the workers start now, before the first item is taken

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            job, item = task
            if not job.set_running_or_notify_cancel():
                continue
            try:
                job.set_result(self._fn(item))
            except BaseException as e:  # noqa: BLE001 - the caller raises it when it takes this item
                job.set_exception(e)

    def _top_up(self) -> None:
        while self._threads and self._ended is None and len(self._jobs) < self._ahead:
            try:
                item = next(self._items)
            except Exception as e:  # StopIteration, or the iterable failed: after the results before it
                self._ended = e
                return
            job: Future = Future()
            self._jobs.append(job)
            self._tasks.put((job, item))

    def __iter__(self) -> "OrderedMap":
        return self

    def __next__(self) -> R:
        if not self._threads:
            return self._fn(next(self._items))
        if not self._jobs:
            raise self._ended if self._ended is not None else StopIteration
        job = self._jobs.popleft()
        self._top_up()  # keep the workers busy while the caller waits for this one
        return job.result()

    def close(self, wait: bool = False) -> None:
        """Drop the items not started and stop the workers; `wait`: until the items running have finished (their
        results are never taken)."""
        running = [job for job in self._jobs if not job.cancel()]
        self._jobs.clear()
        for _ in self._threads:
            self._tasks.put(None)
        if wait:
            for job in running:
                job.exception()  # waits; whatever it raised is not ours to raise
