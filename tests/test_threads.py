"""The thread-pool helpers behind parallel decoding and resizing."""
import pytest

from cogstream_jax.data.threads import balanced_groups, default_threads, even_chunks, resolve_threads, thread_map


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
