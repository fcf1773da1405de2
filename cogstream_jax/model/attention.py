"""Attention kernels and rotary embeddings shared by the vision tower and the LLM.

Three interchangeable implementations, all equal to dense softmax attention:
- "dense": one einsum over every query/key pair (small inputs, tests);
- "chunked": queries processed in blocks under `lax.map`, so at most [B, heads, chunk, S] scores exist at once,
  in the forward and (by rematerialising each block) in the backward pass (long prompts on CPU/TPU);
- "jax": `jax.nn.dot_product_attention` (cuDNN flash attention on GPU when the shapes allow).
Masks are described by `MaskSpec` and built per block, never as a full [L, S] tensor in the chunked path.
GQA is computed by grouping query heads ([B, T, K, G, D]) instead of repeating keys and values.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Impl = Literal["auto", "dense", "chunked", "jax"]
_NEG = -0.7 * float(np.finfo(np.float32).max)


# ---------------------------------------------------------------------------------------------- RoPE
def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Half-split ("rotate_half") rotary embedding in fp32; `cos`/`sin` broadcast over the heads axis."""
    xf = x.astype(jnp.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


def text_rope(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, L, 1, head_dim] for 1-D positions [B, L] (Qwen2 default RoPE)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(emb), jnp.sin(emb)


def vision_rope(rows: np.ndarray, cols: np.ndarray, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin [N, 1, head_dim] for 2-D patch coordinates: angles laid out [h, w, h, w] (spec 1.3)."""
    quarter = head_dim // 4
    inv_freq = 1.0 / (theta ** (jnp.arange(0, 2 * quarter, 2, dtype=jnp.float32) / (2 * quarter)))
    fh = jnp.asarray(rows, jnp.float32)[:, None] * inv_freq
    fw = jnp.asarray(cols, jnp.float32)[:, None] * inv_freq
    hw = jnp.concatenate([fh, fw], axis=-1)
    emb = jnp.concatenate([hw, hw], axis=-1)[:, None, :]
    return jnp.cos(emb), jnp.sin(emb)


# ---------------------------------------------------------------------------------------------- masks
@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Which keys a query may see, described compactly.

    q_index [B, T] / kv_index [B, S]: slot indices for the causal rule (key slot <= query slot);
    kv_valid [B, S]: False for padding and for cache slots not yet written. Any field may be None.
    `aligned` promises q_index == kv_index == arange(T): the plain causal case that fused kernels take directly.
    """

    causal: bool = False
    q_index: jax.Array | None = None
    kv_index: jax.Array | None = None
    kv_valid: jax.Array | None = None
    aligned: bool = False

    def block(self, q_index: jax.Array | None = None) -> jax.Array | None:
        """Boolean mask [B, 1, 1, Tq, S] for the queries `q_index` (defaults to all queries)."""
        mask = None
        if self.causal:
            qi = self.q_index if q_index is None else q_index
            mask = qi[:, :, None] >= self.kv_index[:, None, :]
        if self.kv_valid is not None:
            valid = self.kv_valid[:, None, :]
            mask = valid if mask is None else mask & valid
        return None if mask is None else mask[:, None, None, :, :]


def _scores_softmax_values(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """q [B, T, K, G, D], k/v [B, S, K, D] -> [B, T, K, G, D]; softmax statistics in fp32.

    Both products are plain batched matmuls over (B, kv head) with the G query heads of a kv head stacked along
    the rows, and the softmax normalisation is applied to the [.., T, D] output instead of the [.., T, S]
    probabilities (as flash attention does): the same arithmetic, several times faster on XLA:CPU.
    """
    b, t, kh, g, d = q.shape
    scale = 1.0 / np.sqrt(d)
    # [B, K, G*T, D]: the query groups of one kv head form a single batched matrix product
    qt = q.transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, d)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = jnp.matmul(qt, kt.transpose(0, 1, 3, 2), preferred_element_type=jnp.float32) * scale
    if mask is not None:  # [B, 1, 1, T or 1, S] -> [B, 1, G*T, S]
        mask = jnp.broadcast_to(mask, (mask.shape[0], 1, g, t, mask.shape[-1]))
        scores = jnp.where(mask.reshape(mask.shape[0], 1, g * t, mask.shape[-1]), scores, _NEG)
    weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
    out = jnp.matmul(weights.astype(v.dtype), vt, preferred_element_type=jnp.float32)
    out = out / weights.sum(-1, keepdims=True)
    return out.astype(v.dtype).reshape(b, kh, g, t, d).transpose(0, 3, 1, 2, 4)


#: above this many query x key pairs a masked "jax" call would materialise too much; use the chunked path
_MAX_DENSE_PAIRS = 1 << 24
#: "auto" off GPU: one dense [B, H, T, S] score tensor up to this many elements (256 MiB fp32); beyond it the
#: chunked path (one query chunk at a time, recomputed in the backward pass) bounds memory
_MAX_DENSE_SCORES = 1 << 26


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec | None = None, *, impl: Impl = "auto",
           chunk_size: int = 512) -> jax.Array:
    """Multi-head attention with GQA. q [B, T, H, D], k/v [B, S, K, D] with H % K == 0 -> [B, T, H, D]."""
    b, t, h, d = q.shape
    kh, s = k.shape[2], k.shape[1]
    mask = mask or MaskSpec()
    if impl == "auto":
        on_gpu = jax.default_backend() == "gpu"
        impl = "jax" if on_gpu else ("dense" if b * h * t * s <= _MAX_DENSE_SCORES else "chunked")
    if impl == "jax":
        plain = not mask.causal and mask.kv_valid is None
        plain_causal = mask.causal and mask.aligned and mask.kv_valid is None
        if plain or plain_causal:  # fused (cuDNN flash on GPU) kernels take these without a mask tensor
            return jax.nn.dot_product_attention(q, k, v, is_causal=plain_causal).astype(q.dtype)
        if t * s <= _MAX_DENSE_PAIRS:
            return jax.nn.dot_product_attention(q, k, v, mask=mask.block()[:, 0]).astype(q.dtype)
        impl = "chunked"
    qg = q.reshape(b, t, kh, h // kh, d)
    if impl == "dense" or t <= chunk_size:
        out = _scores_softmax_values(qg, k, v, mask.block())
        return out.reshape(b, t, h, d)
    if impl != "chunked":
        raise ValueError(f"unknown attention implementation {impl!r}")
    n_chunks = -(-t // chunk_size)
    pad = n_chunks * chunk_size - t
    qp = jnp.pad(qg, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    qi = None
    if mask.causal:
        qi = jnp.pad(mask.q_index, ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).max // 2)
        qi = qi.reshape(b, n_chunks, chunk_size).transpose(1, 0, 2)
    qp = qp.reshape(b, n_chunks, chunk_size, kh, h // kh, d).transpose(1, 0, 2, 3, 4, 5)

    # Rematerialised per chunk: the backward pass recomputes one chunk's probabilities at a time instead of
    # keeping [B, heads, T, S] of them alive (flash-attention's memory behaviour, without a custom kernel).
    @jax.checkpoint
    def one_chunk(args):
        q_blk, qi_blk = args
        return _scores_softmax_values(q_blk, k, v, mask.block(q_index=qi_blk))

    out = jax.lax.map(one_chunk, (qp, qi if qi is not None else jnp.zeros((n_chunks,), jnp.int32)))
    out = out.transpose(1, 0, 2, 3, 4, 5).reshape(b, n_chunks * chunk_size, h, d)
    return out[:, :t]
