"""The thread-pool helpers behind parallel decoding and resizing."""
import pytest

from cogstream_jax.data.threads import (MAX_DEFAULT_WORKERS, OrderedMap, balanced_groups, default_threads, even_chunks,
                                        prep_workers, resolve_threads, thread_map)
from cogstream_jax.errors import ConfigError


def test_even_chunks_cover_the_range_in_order():
    for count in (0, 1, 5, 180):
        for parts in (1, 2, 3, 8, 500):
            chunks = even_chunks(count, parts)
            assert [i for c in chunks for i in c] == list(range(count))
            assert len(chunks) <= max(1, parts) and all(len(c) for c in chunks)
            if chunks:
                assert max(map(len, chunks)) - min(map(len, chunks)) <= 1


def test_balanced_groups_are_contiguous_and_balanced():
    costs = [250, 10, 240, 30, 220, 5, 245]
    groups = balanced_groups(costs, 2)
    assert [i for g in groups for i in g] == list(range(len(costs))) and len(groups) == 2
    totals = [sum(costs[i] for i in g) for g in groups]
    assert max(totals) <= 0.6 * sum(costs)
    assert balanced_groups(costs, 1) == [range(7)]
    assert len(balanced_groups([1, 1], 5)) == 2
    assert balanced_groups([], 3) == []


def test_thread_map_keeps_order_and_raises():
    assert thread_map(lambda x: x * x, range(10), 3) == [x * x for x in range(10)]

    def fail(x):
        raise ValueError(f"bad {x}")

    with pytest.raises(ValueError, match="bad"):
        thread_map(fail, [1, 2], 2)


def test_resolve_threads():
    assert resolve_threads(None) == default_threads() >= 1
    assert resolve_threads(3) == 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            resolve_threads(bad)


@pytest.mark.parametrize("workers,ahead", [(1, 0), (1, 3), (3, 2), (4, 8)])
def test_ordered_map_gives_the_results_in_order_whatever_the_workers(workers, ahead):
    """Later items finishing first (shorter sleeps) still come out in order, the same as a list comprehension."""
    import time

    def slow_square(x):
        time.sleep(0.002 * (10 - x))
        return x * x

    got = OrderedMap(slow_square, range(10), workers=workers, ahead=ahead)
    assert list(got) == [x * x for x in range(10)]
    with pytest.raises(StopIteration):
        next(got)
    got.close()


def test_ordered_map_runs_items_at_once_and_raises_errors_in_their_place():
    """Two workers prepare two items at the same time (each waits for the other at a barrier, which one worker
    would never pass), from the start, before any is taken (a training run compiles meanwhile); an error of `fn`
    comes when its item is taken, one of the iterable after the items before it."""
    import threading

    barrier, met = threading.Barrier(2, timeout=30), threading.Event()

    def meet(x):
        if x < 2:
            barrier.wait()
            met.set()
        if x == 2:
            raise ValueError("item 2")
        return x

    def items():
        yield from range(4)
        raise OSError("disk gone")

    got = OrderedMap(meet, items(), workers=2, ahead=2)
    assert met.wait(30)
    assert [next(got), next(got)] == [0, 1]
    with pytest.raises(ValueError, match="item 2"):
        next(got)
    assert next(got) == 3
    with pytest.raises(OSError, match="disk gone"):
        next(got)
    got.close()


def test_prep_workers():
    assert 1 <= prep_workers(None) <= MAX_DEFAULT_WORKERS and prep_workers(3) == 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="--prep_workers"):
            prep_workers(bad)


def test_ordered_map_close_drops_waiting_items_and_can_wait_for_running_ones():
    """Closing stops the workers (daemon threads: a stopping process never waits for them); items not started
    are dropped, `wait=True` returns once the running ones have finished."""
    import time

    started, finished = [], []

    def slow(x):
        started.append(x)
        time.sleep(0.2)
        finished.append(x)
        return x

    got = OrderedMap(slow, range(100), workers=2, ahead=10)
    assert all(t.daemon for t in got._threads)
    while len(started) < 2:
        time.sleep(0.01)
    got.close(wait=True)
    assert sorted(finished) == sorted(started) and len(started) <= 4
    for thread in got._threads:
        thread.join(30)
    assert len(started) <= 4 and not any(t.is_alive() for t in got._threads)
