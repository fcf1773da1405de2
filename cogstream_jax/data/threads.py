"""A small thread-pool helper for the host-side video work (decoding, PIL resize, patchify).

libavcodec and PIL release the GIL while they work, so threads give real parallelism there without the
start-up and pickling costs of processes. Results never depend on the thread count: every task computes a
fixed part of the output.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_DEFAULT_THREADS = 8


def default_threads() -> int:
    """Cores this process may use, capped at 8 (more rarely helps a single clip)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_THREADS, cores))


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
