"""The vision tower over a padded batch of frames: bounded shapes for training and streaming sessions.

`VisionEncoder.__call__` takes a packed patch sequence and a static `VisualLayout`, so every new combination of
grids compiles a new program. Here every frame is padded to a common patch count `P` (a bucket, a multiple of
merge**2) and the layout travels as traced arrays: per-patch (row, col) coordinates for the 2-D RoPE and a
validity mask that the per-frame attention takes as key padding (`MaskSpec.kv_valid`; the fused kernels take it
as segment ids). Padded patches come after a frame's real ones, in whole merge blocks, so the m x m merge of
the real tokens is unchanged; padded frames (all patches invalid) produce finite values nobody reads.

The same weights and arithmetic as `VisionEncoder.__call__` (layer by layer), so the real tokens of a padded
frame equal the unpadded encoding up to float summation order.
"""
from __future__ import annotations

import bisect
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cogstream_jax.model.attention import Impl, MaskSpec, apply_rope, attend, vision_rope
from cogstream_jax.model.scan_layers import run_layers
from cogstream_jax.model.vision import VisionEncoder, VisualLayout


#: patches per frame are padded to one of these (about 1.5x apart, multiples of merge^2 = 4): training and
#: evaluation sessions
PATCH_BUCKETS = (16, 24, 36, 56, 84, 128, 192, 288, 432, 648, 972, 1460, 2188, 3284, 4096)
assert all(p % 4 == 0 for p in PATCH_BUCKETS)


def bucket(n: int, ladder: Sequence[int]) -> int | None:
    """The smallest bucket >= n, None when n is over the ladder."""
    i = bisect.bisect_left(ladder, n)
    return ladder[i] if i < len(ladder) else None


def encode_frames(encoder: VisionEncoder, pixels: jax.Array, rows: jax.Array, cols: jax.Array, valid: jax.Array,
                  merge: int, *, impl: Impl = "auto", mesh: Mesh | None = None, interpret: bool = False,
                  dtype=None, scan: bool = False) -> jax.Array:
    """pixels [F, P, patch_dim], rows/cols [F, P] int, valid [F, P] bool -> merged features [F, P / m^2, hidden].

    Frame f's merged token j is the mean of its patches [m^2 j, m^2 (j + 1)) (block-major order, as packed by
    the processor); tokens past a frame's real count are padding. `scan`: the layers as one `jax.lax.scan`
    (model/scan_layers.py)."""
    cfg = encoder.config
    f, p, _ = pixels.shape
    if p % (merge * merge):
        raise ValueError(f"patches per frame {p} must be a multiple of merge^2 = {merge * merge}")
    n = f * p
    cos, sin = vision_rope(rows.reshape(-1), cols.reshape(-1), cfg.head_dim, cfg.rope_theta)
    x = encoder.embeddings(pixels.reshape(n, -1).astype(dtype or pixels.dtype))
    mask = MaskSpec(kv_valid=valid.astype(bool))

    def run(layer, x, i):
        attn = layer.self_attn
        h = layer.layer_norm1(x)
        split = (n, attn.num_heads, attn.head_dim)
        q = apply_rope(attn.q_proj(h).reshape(split), cos, sin)
        k = apply_rope(attn.k_proj(h).reshape(split), cos, sin)
        v = attn.v_proj(h).reshape(split)
        frames = (a.reshape(f, p, attn.num_heads, attn.head_dim) for a in (q, k, v))
        out = attend(*frames, mask, impl=impl, mesh=mesh, interpret=interpret).reshape(n, -1)
        x = x + attn.out_proj(out)
        return x + layer.mlp(layer.layer_norm2(x))

    x = run_layers(encoder.encoder.layers, run, x, scan=scan)
    x = encoder.post_layernorm(x)
    m2 = merge * merge
    x = x.reshape(f, p // m2, m2, -1)
    if m2 > 1:
        return x.astype(jnp.float32).mean(axis=2).astype(x.dtype)
    return x[:, :, 0]


def frame_arrays(pixel_values: np.ndarray, layout: VisualLayout, patches: int, frames: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Packed pixels + layout -> (pixels [F, P, D], rows [F, P], cols [F, P], valid [F, P], real tokens per frame)
    with P = `patches` and F = `frames` (default: the real frame count); padding is zeros / invalid."""
    merges = set(layout.merges)
    if len(merges) != 1:
        raise ValueError(f"one merge size per visual input expected, got {sorted(merges)}")
    (m,) = merges
    real_frames = sum(t for t, _, _ in layout.grids)
    frames = real_frames if frames is None else frames
    if frames < real_frames:
        raise ValueError(f"{real_frames} frames do not fit {frames}")
    d = pixel_values.shape[-1]
    pix = np.zeros((frames, patches, d), np.float32)
    rows = np.zeros((frames, patches), np.int32)
    cols = np.zeros((frames, patches), np.int32)
    valid = np.zeros((frames, patches), bool)
    r_all, c_all = layout.patch_coordinates()
    tokens, start, f = [], 0, 0
    for t, h, w in layout.grids:
        size = h * w
        if size > patches:
            raise ValueError(f"a {h}x{w} frame has more patches than the bucket's {patches}")
        for _ in range(t):
            sl = slice(start, start + size)
            pix[f, :size] = pixel_values[sl]
            rows[f, :size], cols[f, :size] = r_all[sl], c_all[sl]
            valid[f, :size] = True
            tokens.append(size // (m * m))
            start += size
            f += 1
    return pix, rows, cols, valid, tokens
