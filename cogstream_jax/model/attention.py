"""Attention kernels and rotary embeddings shared by the vision tower and the LLM.

Implementations (`attn_impl`), all equal to dense softmax attention:
- "dense": one einsum over every query/key pair (small inputs, tests);
- "chunked": queries processed in blocks under `lax.map`, so at most [B, heads, chunk, S] scores exist at once,
  in the forward and (by rematerialising each block) in the backward pass;
- "xla": "dense" up to `_MAX_DENSE_SCORES` scores, "chunked" beyond (the CPU choice);
- "splash": the Pallas TPU splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`): causal or
  full block masks, GQA, padding as segment ids, sequences padded to `BLOCK`; under `shard_map` over the mesh
  (batch over data/fsdp, kv heads over tensor). `interpret=True` runs it on any backend (tests on CPU);
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (cuDNN flash attention, bf16/fp16 only) with
  `is_causal` and sequence lengths for padding; under `shard_map` over the mesh like splash. It takes no segment
  ids, so packed sequences (`MaskSpec.segments`: event scoring's one packed row) take the xla path;
- "auto": resolved per target platform by `resolve_attn_impl`: splash on TPU, cuDNN on GPU (bf16/fp16),
  xla elsewhere.
The fused kernels ("splash", "cudnn") run self-attention: training, prefill into an empty cache, vision frames.
Attention against a KV cache (decode, prefill after a kept prefix) always takes the xla path (see `attend`).
An explicit fused choice the target cannot run raises `ConfigError` naming the reason; it never falls back.
Masks are described by `MaskSpec` and built per block, never as a full [L, S] tensor in the chunked path.
GQA is computed by grouping query heads ([B, T, K, G, D]) instead of repeating keys and values.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from cogstream_jax.errors import ConfigError
from cogstream_jax.sharding import DEFAULT_RULES

Impl = Literal["auto", "xla", "dense", "chunked", "splash", "cudnn"]
IMPLS: tuple[str, ...] = ("auto", "xla", "dense", "chunked", "splash", "cudnn")
FUSED: tuple[str, ...] = ("splash", "cudnn")
_NEG = -0.7 * float(np.finfo(np.float32).max)

#: sequence block of the splash kernel (and of the TPU lanes): sequences are padded to a multiple of it
BLOCK = 128


def pad_to_block(n: int, block: int = BLOCK) -> int:
    """`n` rounded up to a multiple of `block` (at least one block): the padding rule of the splash kernel, shared
    with the training length buckets so that batches need no further padding inside attention."""
    return max(block, -(-int(n) // block) * block)


# ---------------------------------------------------------------------------------------------- selection
def normalize_platform(platform: str) -> str:
    """A device/backend platform name as "tpu", "gpu" or "cpu" ("cuda" is a GPU)."""
    platform = platform.lower()
    return "gpu" if platform in ("cuda", "gpu") else platform


def platform_of(mesh: Mesh) -> str:
    """The platform of the devices a mesh holds (compile-only topology devices included)."""
    return normalize_platform(mesh.devices.flat[0].platform)


def cudnn_dtype_ok(dtype) -> bool:
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def resolve_attn_impl(impl: str, platform: str, dtype=None, *, interpret: bool = False) -> str:
    """The implementation `attend` runs for `impl` on devices of `platform` ("tpu", "gpu"/"cuda", "cpu") computing
    in `dtype` (None: unknown). "auto" -> "splash" on TPU, "cudnn" on GPU for bf16/fp16 (fp32 runs take "xla"),
    "xla" elsewhere. An explicit choice the platform cannot run raises `ConfigError` with the reason; `interpret`
    (Pallas interpret mode) lets "splash" run on any platform."""
    if impl not in IMPLS:
        raise ConfigError(f"attn_impl {impl!r}: choose from {', '.join(IMPLS)}")
    platform = normalize_platform(platform)
    if impl == "auto":
        if platform == "tpu":
            return "splash"
        if platform == "gpu" and (dtype is None or cudnn_dtype_ok(dtype)):
            return "cudnn"
        return "xla"
    if impl == "splash" and platform != "tpu" and not interpret:
        raise ConfigError(f"attn_impl 'splash': the Pallas splash kernel compiles for TPU only, and the target "
                          f"platform is {platform!r} (interpret=True runs it anywhere, slowly: tests)")
    if impl == "cudnn" and platform != "gpu":
        raise ConfigError(f"attn_impl 'cudnn': cuDNN flash attention needs an NVIDIA GPU, and the target platform is "
                          f"{platform!r}")
    if impl == "cudnn" and dtype is not None and not cudnn_dtype_ok(dtype):
        raise ConfigError(f"attn_impl 'cudnn': cuDNN flash attention takes bfloat16 or float16 only, and the model "
                          f"computes in {jnp.dtype(dtype).name}; use 'auto' or 'xla' for float32 runs")
    return impl


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
    segments [B, S] (self-attention only, ids >= 0): several sequences packed into one row; a query sees only the
    keys of its own segment (block-diagonal), so each sequence computes exactly what it would alone.
    """

    causal: bool = False
    q_index: jax.Array | None = None
    kv_index: jax.Array | None = None
    kv_valid: jax.Array | None = None
    aligned: bool = False
    segments: jax.Array | None = None

    def is_self_attention(self, t: int, s: int) -> bool:
        """Queries and keys are the same `t` slots (no cache): what the fused kernels take. Padding (`kv_valid`)
        then also marks the padded queries; for the cuDNN path the valid slots of a row must be one contiguous
        run (left or right padding), which every caller's attention mask is."""
        return t == s and (not self.causal or self.aligned)

    def block(self, q_index: jax.Array | None = None) -> jax.Array | None:
        """Boolean mask [B, 1, 1, Tq, S] for the queries `q_index` (defaults to all queries)."""
        mask = None
        if self.causal:
            qi = self.q_index if q_index is None else q_index
            mask = qi[:, :, None] >= self.kv_index[:, None, :]
        if self.kv_valid is not None:
            valid = self.kv_valid[:, None, :]
            mask = valid if mask is None else mask & valid
        if self.segments is not None:  # self-attention: query slot i is key slot i
            qs = self.segments if q_index is None else jnp.take_along_axis(
                self.segments, jnp.clip(q_index, 0, self.segments.shape[1] - 1), axis=1)
            same = qs[:, :, None] == self.segments[:, None, :]
            mask = same if mask is None else mask & same
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


#: "xla": one dense [B, H, T, S] score tensor up to this many elements (256 MiB fp32); beyond it the chunked path
#: (one query chunk at a time, recomputed in the backward pass) bounds memory
_MAX_DENSE_SCORES = 1 << 26


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec | None = None, *, impl: Impl = "auto",
           chunk_size: int = 512, mesh: Mesh | None = None, interpret: bool = False) -> jax.Array:
    """Multi-head attention with GQA. q [B, T, H, D], k/v [B, S, K, D] with H % K == 0 -> [B, T, H, D].

    `impl` is resolved by `resolve_attn_impl` for the platform of `mesh` (else the default backend) and q's dtype.
    The fused kernels take self-attention (`MaskSpec.is_self_attention`); attention against a KV cache takes
    the xla path whatever `impl` says: one decode query reads the cache once (memory-bound, [B, H, 1, S] scores),
    and a prefill after a kept prefix has a slot-offset causal mask that neither kernel takes without a dense mask.
    `mesh`: the fused kernels run under `shard_map` over it (batch over data/fsdp, kv heads over tensor where
    they divide); without one they run as one program (one device). `interpret`: Pallas interpret mode (splash).
    """
    b, t, h, d = q.shape
    kh, s = k.shape[2], k.shape[1]
    mask = mask or MaskSpec()
    platform = platform_of(mesh) if mesh is not None else jax.default_backend()
    impl = resolve_attn_impl(impl, platform, q.dtype, interpret=interpret)
    if impl == "cudnn" and mask.segments is not None:
        impl = "xla"  # jax's cuDNN call takes no segment ids (module docstring)
    if impl in FUSED and mask.is_self_attention(t, s):
        if impl == "splash":
            return _splash(q, k, v, mask, mesh=mesh, interpret=interpret)
        return _cudnn(q, k, v, mask, mesh=mesh)
    if impl in FUSED or impl == "xla":
        impl = "dense" if b * h * t * s <= _MAX_DENSE_SCORES else "chunked"
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
    if mask.causal or mask.segments is not None:
        q_index = mask.q_index if mask.q_index is not None else jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        qi = jnp.pad(q_index, ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).max // 2)
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


# ---------------------------------------------------------------------------------------------- fused kernels
#: mesh axes the fused kernels split batch and (kv) heads over: the activations' rules in `sharding.py`
_BATCH_AXES = tuple(DEFAULT_RULES["batch"] or ())
_HEAD_AXES = tuple(DEFAULT_RULES["kv_heads"] or ())


def _dividing_axes(mesh: Mesh, names: tuple[str, ...], dim: int) -> str | tuple[str, ...] | None:
    """The mesh axes among `names` (size > 1) whose product divides `dim`, as one PartitionSpec entry."""
    axes, size = [], 1
    for name in names:
        n = mesh.shape.get(name, 1)
        if n > 1 and dim % (size * n) == 0:
            axes.append(name)
            size *= n
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def _on_mesh(fn, mesh: Mesh | None, batch_size: int, kv_heads: int, arrays: tuple[jax.Array, ...],
             heads_axis: int) -> jax.Array:
    """`fn(*arrays)`, under `shard_map` over `mesh` when one is given: dim 0 of every array (the batch) over the
    data/fsdp axes and, for the 4-d ones (q, k, v and the result), dim `heads_axis` over tensor, each where the
    size divides (kv heads, so a query head stays with its kv head); the rest is replicated. Inside, the kernel
    sees whole sequences and heads: no sharding rule of the kernel is involved."""
    if mesh is None:
        return fn(*arrays)
    batch, heads = _dividing_axes(mesh, _BATCH_AXES, batch_size), _dividing_axes(mesh, _HEAD_AXES, kv_heads)
    qkv = [batch, None, None, None]
    qkv[heads_axis] = heads

    def spec(x):
        return PartitionSpec(*qkv) if x.ndim == 4 else PartitionSpec(batch, *([None] * (x.ndim - 1)))

    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(x) for x in arrays), out_specs=PartitionSpec(*qkv),
                         check_vma=False)(*arrays)


def splash_block(length: int) -> int:
    """Splash tile along both sequences: the largest of 512, 256, 128 dividing the (padded) length."""
    return next(blk for blk in (512, 256, BLOCK) if length % blk == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, length: int, causal: bool, interpret: bool):
    """A splash kernel for [heads, length, D] queries against [kv heads, length, D] keys (GQA by head groups)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # TPU-only module: imported on use

    blk = splash_block(length)
    blocks = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                           block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    one = sa.CausalMask((length, length)) if causal else sa.FullMask((length, length))
    return sa.make_splash_mha(sa.MultiHeadMask([one] * heads), block_sizes=blocks, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec, *, mesh: Mesh | None,
            interpret: bool) -> jax.Array:
    """Self-attention through the splash kernel. Sequences are right-padded to `pad_to_block`; padding (the
    caller's `kv_valid` and the block padding) is segment 0, tokens segment 1 (packed sequences: their
    `MaskSpec.segments` + 1), so no query row is empty (a padded query sees the padded keys) and token rows equal
    dense attention."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    b, t, h, d = q.shape
    kh = k.shape[2]
    length = pad_to_block(t)
    segments = None
    if mask.kv_valid is not None or mask.segments is not None or length != t:
        valid = jnp.ones((b, t), bool) if mask.kv_valid is None else mask.kv_valid
        ids = jnp.ones((b, t), jnp.int32) if mask.segments is None else mask.segments.astype(jnp.int32) + 1
        segments = jnp.pad(jnp.where(valid, ids, 0), ((0, 0), (0, length - t)))

    def heads_first(x):  # [B, T, N, D] -> [B, N, length, D]
        return jnp.pad(x, ((0, 0), (0, length - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    # the kernel does not scale the logits: scale q (in fp32, rounded once to q's dtype)
    qs = (q.astype(jnp.float32) * (1.0 / np.sqrt(d))).astype(q.dtype)
    args = (heads_first(qs), heads_first(k), heads_first(v))

    def run(q_, k_, v_, seg=None):  # per device: [b, heads, length, D]
        kernel = _splash_kernel(q_.shape[1], length, mask.causal, interpret)
        if seg is None:
            return jax.vmap(kernel)(q_, k_, v_)
        return jax.vmap(lambda a, b_, c, s: kernel(a, b_, c, segment_ids=SegmentIds(s, s)))(q_, k_, v_, seg)

    if segments is not None:
        args = args + (segments,)
    out = _on_mesh(run, mesh, b, kh, args, heads_axis=1)
    return out.transpose(0, 2, 1, 3)[:, :t].astype(q.dtype)


def _cudnn(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec, *, mesh: Mesh | None = None,
           implementation: str = "cudnn") -> jax.Array:
    """Self-attention through `jax.nn.dot_product_attention(implementation="cudnn")`. cuDNN masks padding by
    sequence lengths (valid = a prefix), so each row is first rotated to start at its first valid slot (a no-op
    for right padding, left padding moves to the end) and rotated back after. With a mesh it runs under
    `shard_map` like splash (cuDNN's own partitioning rule refuses q/k/v shardings that differ, which GQA's head
    counts easily produce). `implementation="xla"` runs the same arithmetic on any backend (tests)."""
    call = functools.partial(jax.nn.dot_product_attention, is_causal=mask.causal, implementation=implementation)

    def run(q_, k_, v_, valid=None):
        if valid is None:
            return call(q_, k_, v_).astype(q_.dtype)
        t = q_.shape[1]
        lengths = jnp.maximum(valid.sum(-1), 1).astype(jnp.int32)  # an all-padding row attends its first slot
        start = jnp.argmax(valid, axis=-1).astype(jnp.int32)  # first valid slot (0 when none)
        slots = jnp.arange(t, dtype=jnp.int32)[None]

        def take(x, index):
            return jnp.take_along_axis(x, index[:, :, None, None], axis=1)

        forward = (slots + start[:, None]) % t
        out = call(take(q_, forward), take(k_, forward), take(v_, forward), query_seq_lengths=lengths,
                   key_value_seq_lengths=lengths)
        return take(out, (slots - start[:, None]) % t).astype(q_.dtype)

    args = (q, k, v) if mask.kv_valid is None else (q, k, v, mask.kv_valid)
    return _on_mesh(run, mesh, q.shape[0], k.shape[2], args, heads_axis=2)
