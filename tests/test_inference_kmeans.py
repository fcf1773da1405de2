"""Time-aware k-means equals a plain numpy implementation of protocol 6.1 (same initial centres), including the
empty-cluster re-seeding path; representative frames; k-means++ initialisation."""
from __future__ import annotations

import jax
import numpy as np

from cogstream_jax.inference.kmeans import (frame_gram, kmeans_pp_indices, loop_key_for, num_events, reseed_indices,
                                            time_kmeans)


def numpy_kmeans(x, times, init, alpha=2.0, max_iter=30, tol=1e-4, reseed=None):
    """The spec written out with explicit loops over frames and clusters, like the official code."""
    x = x.astype(np.float64)
    centers, ctimes = x[init].copy(), times[init].astype(np.float64).copy()
    assign = None
    for it in range(max_iter):
        dist = np.zeros((len(x), len(centers)))
        for t in range(len(x)):
            f = np.linalg.norm(x[t] - centers, axis=1)
            d = np.abs(times[t] - ctimes)
            nf = (f - f.min()) / (f.max() - f.min()) if f.max() > f.min() else np.zeros_like(f)
            nt = (d - d.min()) / (d.max() - d.min()) if d.max() > d.min() else np.zeros_like(d)
            dist[t] = np.sqrt(nf ** 2 + alpha * nt ** 2)
        assign = dist.argmin(1)
        new_c, new_t = np.zeros_like(centers), np.zeros_like(ctimes)
        for k in range(len(centers)):
            members = assign == k
            if members.any():
                new_c[k], new_t[k] = x[members].mean(0), times[members].mean()
            else:
                j = reseed(it, k)
                new_c[k], new_t[k] = x[j], times[j]
        shift = np.linalg.norm(new_c - centers, axis=1).sum() + np.linalg.norm(new_t - ctimes)
        centers, ctimes = new_c, new_t
        if shift <= tol:
            return centers, ctimes, assign, it + 1
    return centers, ctimes, assign, max_iter


def numpy_representatives(x, centers, assign, n=2):
    out = []
    for k in range(len(centers)):
        idx = np.nonzero(assign == k)[0]
        d = np.linalg.norm(x[idx] - centers[k], axis=1)
        out.append(sorted(idx[np.argsort(d, kind="stable")[:n]].tolist()))
    return out


def _stream(t=60, f=24, events=5, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((events, f)) * 3
    labels = np.repeat(np.arange(events), t // events)
    x = means[labels] + rng.standard_normal((t, f))
    return x.astype(np.float32), np.arange(t, dtype=np.float32)


def _check_against_numpy(x, times, init, key, max_iter=30):
    ours = time_kmeans(x, times, len(init), key, init_indices=init, max_iterations=max_iter)
    loop_key = loop_key_for(key)
    reseed = lambda it, k: int(reseed_indices(loop_key, it, len(init), len(x))[k])  # noqa: E731
    centers, ctimes, assign, iters = numpy_kmeans(x, times, init, max_iter=max_iter, reseed=reseed)
    np.testing.assert_array_equal(ours.assignments, assign)
    assert ours.iterations == iters
    np.testing.assert_allclose(ours.centers, centers, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.center_times, ctimes, rtol=1e-6)
    reps = [sorted(r for r in row if r >= 0) for row in ours.representatives.tolist()]
    assert reps == numpy_representatives(x, centers, assign)
    return ours


def test_equals_numpy_reference_with_same_initial_centres():
    x, times = _stream()
    ours = _check_against_numpy(x, times, np.asarray([0, 7, 30, 31, 59]), jax.random.PRNGKey(0))
    assert 1 < ours.iterations < 30
    assert (ours.representatives >= 0).all()  # every cluster has >= 2 members here


def test_empty_cluster_is_reseeded_like_the_reference():
    x, times = _stream(t=30, events=3, seed=1)
    # two identical initial centres: argmin always picks the first, so cluster 1 is empty in iteration 0
    init = np.asarray([0, 0, 15, 29])
    ours = _check_against_numpy(x, times, init, jax.random.PRNGKey(5), max_iter=3)
    seed = int(reseed_indices(loop_key_for(jax.random.PRNGKey(5)), 0, 4, 30)[1])
    first = time_kmeans(x, times, 4, jax.random.PRNGKey(5), init_indices=init, max_iterations=1)
    np.testing.assert_array_equal(first.centers[1], x[seed])
    assert first.center_times[1] == times[seed]
    assert ours.assignments.shape == (30,)


def test_representatives_take_all_members_of_small_clusters():
    x = np.asarray([[0.0], [0.1], [0.3], [10.0], [20.0], [20.2]], np.float32)
    times = np.asarray([0, 1, 2, 30, 60, 61], np.float32)
    res = time_kmeans(x, times, 3, jax.random.PRNGKey(0), init_indices=[0, 3, 4], max_iterations=5)
    assert res.assignments.tolist() == [0, 0, 0, 1, 2, 2]
    assert res.representatives.tolist()[1] == [3, -1]
    assert sorted(res.representatives.tolist()[0]) == [0, 1]  # centre 0.133: frames 0.1 and 0.0 nearest


def test_kmeans_pp_is_seeded_and_spreads_centres():
    x, _ = _stream()
    a = np.asarray(kmeans_pp_indices(jax.random.PRNGKey(3), frame_gram(x), 5))
    b = np.asarray(kmeans_pp_indices(jax.random.PRNGKey(3), frame_gram(x), 5))
    np.testing.assert_array_equal(a, b)
    assert len(set((a // 12).tolist())) >= 4  # well separated events: centres land in different events
    assert num_events(135) == 9 and num_events(136) == 10 and num_events(180) == 12
