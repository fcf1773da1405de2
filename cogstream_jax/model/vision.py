"""SigLIP-NaViT vision tower of VideoLLaMA3 (spec videollama3.md section 1) and the mlp2x_gelu projector.

The packed patch sequence of a request holds images and video frames of different resolutions. Attention is
block-diagonal **per frame**; since every frame of one item has the same patch count, each item is simply a
batch of `t` independent sequences of `h*w` patches. The layout (grids and merge sizes) is static: it comes
from the host-side processor and fixes the shapes, so it is passed as a hashable `VisualLayout`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from cogstream_jax.config import ModelConfig, VisionConfig
from cogstream_jax.errors import InputError
from cogstream_jax.model.attention import Impl, MaskSpec, apply_rope, attend, vision_rope
from cogstream_jax.model.layers import LayerNorm, Linear


@dataclasses.dataclass(frozen=True)
class VisualLayout:
    """Static description of the packed visual input: per item (t, h, w) in patches and its merge size."""

    grids: tuple[tuple[int, int, int], ...]
    merges: tuple[int, ...]

    @classmethod
    def from_arrays(cls, grid_sizes, merge_sizes) -> "VisualLayout":
        grids = tuple(tuple(int(x) for x in g) for g in np.asarray(grid_sizes).reshape(-1, 3))
        merges = tuple(int(m) for m in np.asarray(merge_sizes).reshape(-1))
        if len(grids) != len(merges):
            raise InputError(f"grid_sizes has {len(grids)} items but merge_sizes has {len(merges)}")
        for i, ((t, h, w), m) in enumerate(zip(grids, merges)):
            if min(t, h, w) <= 0 or m <= 0 or h % m or w % m:
                raise InputError(f"grid_sizes[{i}] = {(t, h, w)} is not divisible by merge_sizes[{i}] = {m}")
        return cls(grids, merges)

    @property
    def num_patches(self) -> int:
        return sum(t * h * w for t, h, w in self.grids)

    @property
    def tokens_per_item(self) -> tuple[int, ...]:
        return tuple(t * (h // m) * (w // m) for (t, h, w), m in zip(self.grids, self.merges))

    @property
    def num_tokens(self) -> int:
        return sum(self.tokens_per_item)

    def patch_coordinates(self) -> tuple[np.ndarray, np.ndarray]:
        """(row, col) of every packed patch in its own frame, block-major within merge blocks (spec 1.3/4.4)."""
        rows, cols = [], []
        for (t, h, w), m in zip(self.grids, self.merges):
            r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
            shape = (h // m, m, w // m, m)
            r = r.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
            c = c.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
            rows.append(np.tile(r, t))
            cols.append(np.tile(c, t))
        return np.concatenate(rows), np.concatenate(cols)

    def check_pixels(self, pixel_values) -> None:
        n = int(pixel_values.shape[0])
        if n != self.num_patches:
            raise InputError(
                f"pixel_values has {n} rows but grid_sizes {list(self.grids)} imply "
                f"sum(t*h*w) = {self.num_patches} patches"
            )


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, param_dtype, dtype):
        d = cfg.hidden_size
        kw = dict(use_bias=True, rngs=rngs, param_dtype=param_dtype, dtype=dtype,
                  units=(("vit_heads", cfg.head_dim),))  # heads are never split across tensor ranks
        self.q_proj = Linear(d, d, axes=("vit_embed", "vit_heads"), **kw)
        self.k_proj = Linear(d, d, axes=("vit_embed", "vit_heads"), **kw)
        self.v_proj = Linear(d, d, axes=("vit_embed", "vit_heads"), **kw)
        self.out_proj = Linear(d, d, axes=("vit_heads", "vit_embed"), **kw)
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, layout: VisualLayout, impl: Impl,
                 mesh: Mesh | None = None, interpret: bool = False) -> jax.Array:
        n = x.shape[0]
        split = (n, self.num_heads, self.head_dim)
        q = apply_rope(self.q_proj(x).reshape(split), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(split), cos, sin)
        v = self.v_proj(x).reshape(split)
        outs, start = [], 0
        for t, h, w in layout.grids:  # each frame is its own attention segment: frames are the batch
            size = t * h * w
            sl = slice(start, start + size)
            frames = (a[sl].reshape(t, h * w, self.num_heads, self.head_dim) for a in (q, k, v))
            outs.append(attend(*frames, MaskSpec(), impl=impl, mesh=mesh, interpret=interpret).reshape(size, -1))
            start += size
        return self.out_proj(jnp.concatenate(outs, axis=0) if len(outs) > 1 else outs[0])


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, param_dtype, dtype):
        kw = dict(use_bias=True, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("vit_embed", "vit_mlp"), **kw)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("vit_mlp", "vit_embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class VisionEncoderLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, param_dtype, dtype):
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, axis_name="vit_norm", param_dtype=param_dtype)
        self.self_attn = VisionAttention(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, axis_name="vit_norm", param_dtype=param_dtype)
        self.mlp = VisionMLP(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)

    def __call__(self, x, cos, sin, layout: VisualLayout, impl: Impl, mesh: Mesh | None = None,
                 interpret: bool = False):
        x = x + self.self_attn(self.layer_norm1(x), cos, sin, layout, impl, mesh, interpret)
        return x + self.mlp(self.layer_norm2(x))


class VisionEmbeddings(nnx.Module):
    """The 14x14 stride-14 conv is exactly a linear map over the 588-value (C, y, x) rows (spec 1.2)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, param_dtype, dtype):
        self.patch_embedding = Linear(cfg.patch_dim, cfg.hidden_size, use_bias=True, axes=("vit_patch", "vit_embed"),
                                      rngs=rngs, param_dtype=param_dtype, dtype=dtype)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        return self.patch_embedding(pixel_values)


class VisionEncoder(nnx.Module):
    """Patch embedding -> pre-LN layers -> post-LayerNorm -> m x m merge (mean of consecutive m^2 rows)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32):
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.encoder = VisionLayers(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, axis_name="vit_norm",
                                        param_dtype=param_dtype)

    def __call__(self, pixel_values: jax.Array, layout: VisualLayout, *, impl: Impl = "auto",
                 mesh: Mesh | None = None, interpret: bool = False) -> jax.Array:
        """pixel_values [N, 588] -> merged features [sum t*(h/m)*(w/m), hidden] in item order."""
        rows, cols = layout.patch_coordinates()
        cos, sin = vision_rope(rows, cols, self.config.head_dim, self.config.rope_theta)
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x, cos, sin, layout, impl, mesh, interpret)
        x = self.post_layernorm(x)
        return merge_patches(x, layout)


class VisionLayers(nnx.Module):
    """Holds `layers` so parameter paths read `encoder.layers.N...` as in both checkpoint layouts."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, param_dtype, dtype):
        self.layers = nnx.List([VisionEncoderLayer(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
                                for _ in range(cfg.num_hidden_layers)])


def merge_patches(x: jax.Array, layout: VisualLayout) -> jax.Array:
    """m x m spatial merge: for m = 2 the reference's bilinear resize equals 2x2 mean pooling (spec 1.7)."""
    outs, start = [], 0
    for (t, h, w), m in zip(layout.grids, layout.merges):
        size = t * h * w
        item = x[start:start + size]
        if m > 1:
            item = item.astype(jnp.float32).reshape(size // (m * m), m * m, -1).mean(axis=1).astype(x.dtype)
        outs.append(item)
        start += size
    return jnp.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]


class Projector(nnx.Module):
    """mlp2x_gelu: Linear -> exact (erf) GELU -> Linear; children `readout.0` / `readout.2` as in the checkpoints."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32):
        kw = dict(use_bias=True, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.readout = nnx.Dict({
            "0": Linear(cfg.vision.hidden_size, cfg.text.hidden_size, axes=("vit_embed", "mlp"), **kw),
            "2": Linear(cfg.text.hidden_size, cfg.text.hidden_size, axes=("mlp", "embed"), **kw),
        })

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.readout["2"](jax.nn.gelu(self.readout["0"](x), approximate=False))


def split_items(features: jax.Array, layout: VisualLayout) -> Sequence[jax.Array]:
    """Per-item slices of merged features."""
    bounds = np.cumsum((0,) + layout.tokens_per_item)
    return [features[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
