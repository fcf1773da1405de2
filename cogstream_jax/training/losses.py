"""Cross-entropy at supervised positions only, as sums, so accumulation can divide once by the token count.

The model evaluates its lm_head at `logits_positions` [B, P]: position p predicts token p + 1 (the usual shift).
`supervised_positions` builds these positions, their target ids and a weight mask on the host from the
official `labels` (-100 = not supervised), padded to a fixed count P so shapes stay static.

Stage 1 (protocol 4) constrains the softmax to the 16 allowed ids: every other logit is set to -inf before the
ordinary CE, which equals a softmax over the allowed set. Stage 2 is the plain causal-LM CE over the answer.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cogstream_jax.errors import DataError

IGNORE_INDEX = -100


def supervised_positions(labels: np.ndarray, num_positions: int | None = None, multiple: int = 16
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """labels [..., L] -> (positions, targets, weights) [..., P]; logits at positions[j] predict targets[j].

    P = `num_positions`, or the largest per-row count rounded up to `multiple`. Padding slots point at
    position 0 with weight 0.
    """
    labels = np.asarray(labels)
    lead, length = labels.shape[:-1], labels.shape[-1]
    flat = labels.reshape(-1, length)
    shifted = flat[:, 1:]  # token p + 1 is predicted at position p
    counts = (shifted != IGNORE_INDEX).sum(-1)
    needed = int(counts.max(initial=0))
    if num_positions is None:
        num_positions = max(multiple, -(-needed // multiple) * multiple)
    if needed > num_positions:
        raise DataError(f"labels: a row has {needed} supervised tokens, more than num_positions={num_positions}")
    positions = np.zeros((flat.shape[0], num_positions), np.int32)
    targets = np.zeros((flat.shape[0], num_positions), np.int32)
    weights = np.zeros((flat.shape[0], num_positions), np.float32)
    for r in range(flat.shape[0]):
        (idx,) = np.nonzero(shifted[r] != IGNORE_INDEX)
        positions[r, :len(idx)] = idx
        targets[r, :len(idx)] = shifted[r, idx]
        weights[r, :len(idx)] = 1.0
    shape = (*lead, num_positions)
    return positions.reshape(shape), targets.reshape(shape), weights.reshape(shape)


def allowed_mask(allowed_ids: Sequence[int], vocab_size: int) -> np.ndarray:
    """Boolean [V] mask of the ids the stage-1 softmax may use."""
    ids = np.asarray(sorted(set(int(i) for i in allowed_ids)), np.int64)
    if ids.size == 0 or ids.min() < 0 or ids.max() >= vocab_size:
        raise DataError(f"allowed ids {ids.tolist()} are not all inside the vocabulary (size {vocab_size})")
    mask = np.zeros((vocab_size,), bool)
    mask[ids] = True
    return mask


def ce_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array,
            allowed: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token CE, sum of weights) in fp32; `allowed` [V] bool restricts the softmax.

    Returned as sums so that micro-batches add up and the mean is taken once over the whole accumulated batch.
    """
    logits = logits.astype(jnp.float32)
    if allowed is not None:
        logits = jnp.where(allowed, logits, -jnp.inf)
    logp = jax.nn.log_softmax(logits, axis=-1)
    token_logp = jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    # padding slots may point at a disallowed id (0): their -inf must not leak into the sum as NaN
    token_nll = jnp.where(weights > 0, -token_logp, 0.0)
    return jnp.sum(token_nll * weights), jnp.sum(weights)
