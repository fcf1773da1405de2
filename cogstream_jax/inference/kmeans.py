"""Time-aware k-means over frames (protocol 6.1, official `kmeans_with_time_min_max`), vectorised and jitted.

Per iteration: Euclidean feature distances and |time| distances of every frame to every centre, each
min-max normalised across the centres PER FRAME (an all-equal row becomes 0), combined as
sqrt(f^2 + alpha * t^2) with alpha 2, argmin assignment, mean update of features and times, empty clusters
re-seeded from one random frame (feature and time), stop after `max_iterations` or when
sum_k ||dc_k|| + ||dt|| <= tol. Initialisation is k-means++ on features only.

Differences from the official code, on purpose: randomness is a JAX PRNG key instead of Python `random` /
`torch.multinomial` (so runs are reproducible), and the loops over frames and clusters are array operations.
`init_indices` injects the initial centres (tests compare against a plain numpy implementation).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from cogstream_jax.errors import InputError

ALPHA = 2.0
MAX_ITERATIONS = 30
TOL = 1e-4
FRAMES_PER_EVENT = 15  # memory_length = ceil(T / 15)
MIN_EVENTS = 10  # compression runs only when memory_length > 9, i.e. T > 135
REPRESENTATIVES = 2


@dataclass(frozen=True)
class KMeansResult:
    centers: np.ndarray  # [K, F] float32
    center_times: np.ndarray  # [K]
    assignments: np.ndarray  # [T] int, from the last iteration (before its centre update, as official)
    iterations: int
    representatives: np.ndarray  # [K, 2] frame indices nearest to each centre, -1 where the cluster is smaller


def num_events(num_frames: int) -> int:
    """Official memory_length = ceil(T / 15)."""
    return -(-int(num_frames) // FRAMES_PER_EVENT)


def pairwise_distances(x: jax.Array, centers: jax.Array) -> jax.Array:
    """Euclidean distances [T, K] (torch.cdist semantics; clamped at 0 before the square root)."""
    sq = jnp.sum(x * x, -1)[:, None] + jnp.sum(centers * centers, -1)[None, :] - 2.0 * (x @ centers.T)
    return jnp.sqrt(jnp.maximum(sq, 0.0))


def row_minmax(d: jax.Array) -> jax.Array:
    """Min-max normalise each row across its K entries; rows whose entries are all equal become 0."""
    lo, hi = d.min(-1, keepdims=True), d.max(-1, keepdims=True)
    span = hi - lo
    return jnp.where(span > 0, (d - lo) / jnp.where(span > 0, span, 1.0), 0.0)


def combined_distances(x, times, centers, center_times, alpha: float) -> jax.Array:
    nf = row_minmax(pairwise_distances(x, centers))
    nt = row_minmax(jnp.abs(times[:, None] - center_times[None, :]))
    return jnp.sqrt(nf * nf + alpha * nt * nt)


def reseed_indices(key: jax.Array, iteration: int | jax.Array, num_clusters: int, num_frames: int) -> jax.Array:
    """The frame each cluster would be re-seeded from if it were empty at this iteration."""
    return jax.random.randint(jax.random.fold_in(key, iteration), (num_clusters,), 0, num_frames)


@functools.partial(jax.jit, static_argnames=("num_clusters",))
def kmeans_pp_indices(key: jax.Array, x: jax.Array, num_clusters: int) -> jax.Array:
    """k-means++ on features: first centre uniform, then each next drawn with p ~ (nearest distance)^2
    (uniform when every distance is 0)."""
    t = x.shape[0]
    first_key, loop_key = jax.random.split(key)
    first = jax.random.randint(first_key, (), 0, t)
    indices = jnp.zeros((num_clusters,), jnp.int32).at[0].set(first)
    nearest = pairwise_distances(x, x[first][None])[:, 0]

    def body(i, carry):
        indices, nearest = carry
        weights = nearest * nearest
        total = weights.sum()
        logits = jnp.where(total > 0, jnp.log(jnp.where(weights > 0, weights, 0.0)), 0.0)
        pick = jax.random.categorical(jax.random.fold_in(loop_key, i), logits).astype(jnp.int32)
        nearest = jnp.minimum(nearest, pairwise_distances(x, x[pick][None])[:, 0])
        return indices.at[i].set(pick), nearest

    indices, _ = jax.lax.fori_loop(1, num_clusters, body, (indices, nearest))
    return indices


@functools.partial(jax.jit, static_argnames=("alpha", "max_iterations", "tol"))
def _iterate(x, times, centers, center_times, key, *, alpha, max_iterations, tol):
    t, k = x.shape[0], centers.shape[0]

    def cond(carry):
        i, _, _, _, converged = carry
        return (i < max_iterations) & ~converged

    def body(carry):
        i, centers, center_times, _, _ = carry
        assign = jnp.argmin(combined_distances(x, times, centers, center_times, alpha), axis=-1)
        onehot = jax.nn.one_hot(assign, k, dtype=x.dtype)  # [T, K]
        counts = onehot.sum(0)
        safe = jnp.maximum(counts, 1.0)
        new_centers = (onehot.T @ x) / safe[:, None]
        new_times = (onehot.T @ times) / safe
        seed = reseed_indices(key, i, k, t)
        empty = counts == 0
        new_centers = jnp.where(empty[:, None], x[seed], new_centers)
        new_times = jnp.where(empty, times[seed], new_times)
        shift = jnp.linalg.norm(new_centers - centers, axis=1).sum() + jnp.linalg.norm(new_times - center_times)
        return i + 1, new_centers, new_times, assign.astype(jnp.int32), shift <= tol

    carry = (jnp.int32(0), centers, center_times, jnp.zeros((t,), jnp.int32), jnp.bool_(False))
    return jax.lax.while_loop(cond, body, carry)


@functools.partial(jax.jit, static_argnames=("per_cluster",))
def representative_frames(x: jax.Array, centers: jax.Array, assignments: jax.Array, per_cluster: int = REPRESENTATIVES
                          ) -> jax.Array:
    """[K, per_cluster] member frames nearest (Euclidean) to each centre, nearest first; -1 where a cluster has
    fewer members (then all its members are taken, as official `select_additional_frames`)."""
    k = centers.shape[0]
    d = pairwise_distances(x, centers)  # [T, K]
    member = assignments[:, None] == jnp.arange(k)[None, :]
    masked = jnp.where(member, d, jnp.inf).T  # [K, T]
    neg, idx = jax.lax.top_k(-masked, per_cluster)
    return jnp.where(jnp.isfinite(neg), idx, -1).astype(jnp.int32)


def time_kmeans(features, timestamps, num_clusters: int, key: jax.Array, *, alpha: float = ALPHA,
                max_iterations: int = MAX_ITERATIONS, tol: float = TOL, init_indices=None) -> KMeansResult:
    """Cluster T frames ([T, P, D] or [T, F] features, [T] timestamps) into `num_clusters` events."""
    x = jnp.asarray(features, jnp.float32)
    x = x.reshape(x.shape[0], -1)
    times = jnp.asarray(timestamps, jnp.float32).reshape(-1)
    t = x.shape[0]
    if times.shape[0] != t:
        raise InputError(f"timestamps: {times.shape[0]} values for {t} frames")
    if not 0 < num_clusters <= t:
        raise InputError(f"num_clusters: must be in [1, {t}] for {t} frames, got {num_clusters}")
    init_key, loop_key = jax.random.split(key)
    if init_indices is None:
        init = kmeans_pp_indices(init_key, x, num_clusters)
    else:
        init = jnp.asarray(init_indices, jnp.int32)
        if init.shape != (num_clusters,):
            raise InputError(f"init_indices: expected {num_clusters} frame indices, got shape {tuple(init.shape)}")
    iterations, centers, center_times, assign, _ = _iterate(x, times, x[init], times[init], loop_key, alpha=alpha,
                                                            max_iterations=max_iterations, tol=tol)
    reps = representative_frames(x, centers, assign)
    return KMeansResult(np.asarray(centers), np.asarray(center_times), np.asarray(assign), int(iterations),
                        np.asarray(reps))


def loop_key_for(key: jax.Array) -> jax.Array:
    """The key `time_kmeans` uses for empty-cluster re-seeding (for tests reproducing that path)."""
    return jax.random.split(key)[1]
