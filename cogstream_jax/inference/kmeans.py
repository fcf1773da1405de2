"""Time-aware k-means over frames (protocol 6.1, official `kmeans_with_time_min_max`), vectorised and jitted.

Per iteration: Euclidean feature distances and |time| distances of every frame to every centre, each
min-max normalised across the centres PER FRAME (an all-equal row becomes 0), combined as
sqrt(f^2 + alpha * t^2) with alpha 2, argmin assignment, mean update of features and times, empty clusters
re-seeded from one random frame (feature and time), stop after `max_iterations` or when
sum_k ||dc_k|| + ||dt|| <= tol. Initialisation is k-means++ on features only.

Differences from the official code, on purpose: randomness is a JAX PRNG key instead of Python `random` /
`torch.multinomial` (so runs are reproducible), and the loops over frames and clusters are array operations.
`init_indices` injects the initial centres (tests compare against a plain numpy implementation).

Centres are kept as weights over frames (a mean is a weighted sum of member frames, a re-seed a one-hot), so
after one Gram matrix G = x x^T [T, T] every distance, update and convergence test is exact algebra on G: the
T x P*D features (180 x 301k floats for CogReasoner) are read twice per call instead of twice per iteration.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from cogstream_jax.errors import InputError
from cogstream_jax.multihost import to_host

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


def gram_distances(gram: jax.Array, weights: jax.Array) -> jax.Array:
    """Euclidean distances [T, K] from every frame to centres given as frame weights [K, T] (centre = W @ x).

    Uses ||x_t||^2 + ||c_k||^2 - 2 x_t.c_k with the frame Gram matrix G = x x^T: the same matrix-product
    formula torch.cdist uses for inputs this size, but after the one product G every k-means step costs O(T^2 K)
    instead of a pass over the T x P*D features (clamped at 0 before the square root)."""
    cross = weights @ gram  # [K, T]: c_k . x_t
    c_sq = jnp.sum(cross * weights, axis=1)  # [K]: w_k G w_k^T
    sq = jnp.diagonal(gram)[:, None] + c_sq[None, :] - 2.0 * cross.T
    return jnp.sqrt(jnp.maximum(sq, 0.0))


def row_minmax(d: jax.Array) -> jax.Array:
    """Min-max normalise each row across its K entries; rows whose entries are all equal become 0."""
    lo, hi = d.min(-1, keepdims=True), d.max(-1, keepdims=True)
    span = hi - lo
    return jnp.where(span > 0, (d - lo) / jnp.where(span > 0, span, 1.0), 0.0)


def combined_distances(gram, times, weights, alpha: float) -> jax.Array:
    nf = row_minmax(gram_distances(gram, weights))
    nt = row_minmax(jnp.abs(times[:, None] - (weights @ times)[None, :]))
    return jnp.sqrt(nf * nf + alpha * nt * nt)


def reseed_indices(key: jax.Array, iteration: int | jax.Array, num_clusters: int, num_frames: int) -> jax.Array:
    """The frame each cluster would be re-seeded from if it were empty at this iteration."""
    return jax.random.randint(jax.random.fold_in(key, iteration), (num_clusters,), 0, num_frames)


@jax.jit
def frame_gram(x: jax.Array) -> jax.Array:
    """G = x x^T [T, T] in fp32 at highest precision: the one pass over the features that clustering needs."""
    return jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("num_clusters",))
def kmeans_pp_indices(key: jax.Array, gram: jax.Array, num_clusters: int) -> jax.Array:
    """k-means++ on features: first centre uniform, then each next drawn with p ~ (nearest distance)^2
    (uniform when every distance is 0)."""
    t = gram.shape[0]
    eye = jnp.eye(t, dtype=gram.dtype)
    first_key, loop_key = jax.random.split(key)
    first = jax.random.randint(first_key, (), 0, t)
    indices = jnp.zeros((num_clusters,), jnp.int32).at[0].set(first)
    nearest = gram_distances(gram, eye[first][None])[:, 0]

    def body(i, carry):
        indices, nearest = carry
        weights = nearest * nearest
        total = weights.sum()
        logits = jnp.where(total > 0, jnp.log(jnp.where(weights > 0, weights, 0.0)), 0.0)
        pick = jax.random.categorical(jax.random.fold_in(loop_key, i), logits).astype(jnp.int32)
        nearest = jnp.minimum(nearest, gram_distances(gram, eye[pick][None])[:, 0])
        return indices.at[i].set(pick), nearest

    indices, _ = jax.lax.fori_loop(1, num_clusters, body, (indices, nearest))
    return indices


@functools.partial(jax.jit, static_argnames=("alpha", "max_iterations", "tol"))
def _iterate(gram, times, weights, key, *, alpha, max_iterations, tol):
    """The k-means loop on centre weights [K, T]; returns (iterations, weights, assignments, converged)."""
    k, t = weights.shape
    eye = jnp.eye(t, dtype=gram.dtype)

    def cond(carry):
        i, _, _, converged = carry
        return (i < max_iterations) & ~converged

    def body(carry):
        i, weights, _, _ = carry
        assign = jnp.argmin(combined_distances(gram, times, weights, alpha), axis=-1)
        onehot = jax.nn.one_hot(assign, k, dtype=gram.dtype)  # [T, K]
        counts = onehot.sum(0)
        new = onehot.T / jnp.maximum(counts, 1.0)[:, None]
        empty = counts == 0
        new = jnp.where(empty[:, None], eye[reseed_indices(key, i, k, t)], new)
        delta = new - weights
        feat_shift = jnp.sqrt(jnp.maximum(jnp.sum((delta @ gram) * delta, axis=1), 0.0)).sum()
        shift = feat_shift + jnp.linalg.norm((new - weights) @ times)
        return i + 1, new, assign.astype(jnp.int32), shift <= tol

    carry = (jnp.int32(0), weights, jnp.zeros((t,), jnp.int32), jnp.bool_(False))
    return jax.lax.while_loop(cond, body, carry)


@functools.partial(jax.jit, static_argnames=("per_cluster",))
def representative_frames(gram: jax.Array, weights: jax.Array, assignments: jax.Array,
                          per_cluster: int = REPRESENTATIVES) -> jax.Array:
    """[K, per_cluster] member frames nearest (Euclidean) to each centre, nearest first; -1 where a cluster has
    fewer members (then all its members are taken, as official `select_additional_frames`)."""
    k = weights.shape[0]
    d = gram_distances(gram, weights)  # [T, K]
    member = assignments[:, None] == jnp.arange(k)[None, :]
    masked = jnp.where(member, d, jnp.inf).T  # [K, T]
    neg, idx = jax.lax.top_k(-masked, per_cluster)
    return jnp.where(jnp.isfinite(neg), idx, -1).astype(jnp.int32)


@jax.jit
def _centres(x, times, weights):
    return jnp.matmul(weights, x, precision=jax.lax.Precision.HIGHEST), weights @ times


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
    gram = frame_gram(x)
    if init_indices is None:
        init = kmeans_pp_indices(init_key, gram, num_clusters)
    else:
        init = jnp.asarray(init_indices, jnp.int32)
        if init.shape != (num_clusters,):
            raise InputError(f"init_indices: expected {num_clusters} frame indices, got shape {tuple(init.shape)}")
    weights = jax.nn.one_hot(init, t, dtype=jnp.float32)
    iterations, weights, assign, _ = _iterate(gram, times, weights, loop_key, alpha=alpha,
                                              max_iterations=max_iterations, tol=tol)
    reps = representative_frames(gram, weights, assign)
    centers, center_times = _centres(x, times, weights)
    return KMeansResult(to_host(centers), to_host(center_times), to_host(assign), int(iterations), to_host(reps))


def loop_key_for(key: jax.Array) -> jax.Array:
    """The key `time_kmeans` uses for empty-cluster re-seeding (for tests reproducing that path)."""
    return jax.random.split(key)[1]
