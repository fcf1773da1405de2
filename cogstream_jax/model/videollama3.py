"""The VideoLLaMA3 model: vision tower + projector + Qwen2 + untied lm_head.

`forward` is the traced computation (call it inside your own jit, e.g. a train step, with a static
`VisualLayout` and feature count). `__call__` is the eager convenience API: it validates inputs on the host
(clear errors for inconsistent pixel rows or placeholder counts), derives the static metadata and runs a cached
jit of `forward`. The lm_head runs only where logits are requested, so a 152k vocabulary never produces
[L, V] logits unless asked to.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from cogstream_jax.config import ModelConfig
from cogstream_jax.errors import InputError
from cogstream_jax.model.attention import Impl, normalize_platform, platform_of, resolve_attn_impl
from cogstream_jax.model.layers import Linear, active_dropout_key
from cogstream_jax.model.qwen2 import KVCache, Qwen2Model
from cogstream_jax.model.vision import Projector, VisionEncoder, VisualLayout


@struct.dataclass
class ModelOutput:
    logits: jax.Array | None
    cache: KVCache | None = None
    hidden_states: jax.Array | None = None


class VideoLlama3(nnx.Module):
    """Attribute names follow the original checkpoint: `vision_encoder`, `mm_projector`, `language_model`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None = None, param_dtype: Any = jnp.float32,
                 dtype: Any = jnp.float32):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.dtype = dtype
        self.vision_encoder = VisionEncoder(config.vision, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.mm_projector = Projector(config, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.language_model = Qwen2Model(config.text, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.lm_head = Linear(config.text.hidden_size, config.text.vocab_size, use_bias=False, axes=("embed", "vocab"),
                              rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        # attention (static, part of the graphdef): set them with `use_attention` before tracing
        self.attn_impl: Impl = "auto"
        self.attn_chunk_size = 512
        self.attn_mesh: Mesh | None = None  # the mesh the splash kernel is shard_mapped over
        self.attn_interpret = False  # Pallas interpret mode (the splash kernel on CPU: tests)
        self.scan_layers = False  # decoder layers as one jax.lax.scan (static; model/scan_layers.py)

    # ------------------------------------------------------------------------------------------ traced parts
    def encode_visual(self, pixel_values: jax.Array, layout: VisualLayout) -> jax.Array:
        """Vision tower + projector: [N, 588] -> [num merged tokens, hidden] in item order."""
        feats = self.vision_encoder(pixel_values.astype(self.dtype), layout, impl=self.attn_impl, mesh=self.attn_mesh,
                                    interpret=self.attn_interpret)
        return self.mm_projector(feats)

    def embed(self, input_ids: jax.Array, visual: jax.Array | None, compression_mask: jax.Array | None,
              num_kept: int) -> jax.Array:
        """Token embeddings with placeholder slots filled, in order, by the (kept) visual features."""
        embeds = self.language_model.embed_tokens(input_ids)
        if visual is None:
            return embeds
        if compression_mask is not None:
            keep = jnp.nonzero(compression_mask, size=num_kept, fill_value=0)[0]
            visual = visual[keep]
        b, length, d = embeds.shape
        is_slot = jnp.isin(input_ids, jnp.asarray(self.config.placeholder_ids)).reshape(-1)
        order = jnp.clip(jnp.cumsum(is_slot) - 1, 0, max(num_kept - 1, 0))
        filled = jnp.where(is_slot[:, None], visual[order].astype(embeds.dtype), embeds.reshape(-1, d))
        return filled.reshape(b, length, d)

    def logits_at(self, hidden: jax.Array, positions: jax.Array | None) -> jax.Array:
        """lm_head in fp32 at `positions` [B, P] (all positions when None)."""
        if positions is not None:
            hidden = jnp.take_along_axis(hidden, positions[..., None].astype(jnp.int32), axis=1)
        return self.lm_head(hidden).astype(jnp.float32)

    def forward(self, input_ids: jax.Array, *, pixel_values: jax.Array | None = None,
                layout: VisualLayout | None = None, visual_features: jax.Array | None = None,
                compression_mask: jax.Array | None = None, num_kept: int | None = None,
                attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
                cache: KVCache | None = None, cache_is_empty: bool = False,
                logits_positions: jax.Array | None = None, compute_logits: bool = True,
                remat: bool | str = False, segment_ids: jax.Array | None = None) -> ModelOutput:
        """The whole model as a traceable function (static: layout, num_kept, cache_is_empty, compute_logits,
        remat: False/"none" or a decoder-layer policy name from `qwen2.REMAT_POLICIES`). `cache_is_empty` marks a
        prefill into a fresh cache (cheaper attention, fused kernels). `segment_ids` [B, T]: sequences packed into
        one row, each attending only to itself (`Qwen2Model`; pass per-sequence `positions`)."""
        if visual_features is None and pixel_values is not None:
            visual_features = self.encode_visual(pixel_values, layout)
        if visual_features is not None and num_kept is None:
            num_kept = visual_features.shape[0]
        embeds = self.embed(input_ids, visual_features, compression_mask, num_kept or 0)
        b, length = input_ids.shape
        if positions is None:
            start = 0 if cache is None else cache.index
            positions = start + jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        hidden, cache = self.text_hidden(embeds, positions, attention_mask, cache, cache_is_empty=cache_is_empty,
                                         remat=remat, segment_ids=segment_ids)
        logits = self.logits_at(hidden, logits_positions) if compute_logits else None
        return ModelOutput(logits=logits, cache=cache, hidden_states=hidden)

    def text_hidden(self, embeds: jax.Array, positions: jax.Array, attention_mask: jax.Array | None,
                    cache: KVCache | None = None, *, cache_is_empty: bool = False, remat: bool | str = False,
                    segment_ids: jax.Array | None = None, rows_mapped: bool = False
                    ) -> tuple[jax.Array, KVCache | None]:
        """The decoder (`qwen2.Qwen2Model.__call__`) with the attention this model is bound to (implementation,
        chunking, mesh, interpret mode, scanned layers): every traced pass over embeddings goes through here."""
        return self.language_model(embeds, positions, attention_mask, cache, cache_is_empty=cache_is_empty,
                                   impl=self.attn_impl, chunk_size=self.attn_chunk_size, remat=remat,
                                   mesh=self.attn_mesh, interpret=self.attn_interpret, scan=self.scan_layers,
                                   segment_ids=segment_ids, rows_mapped=rows_mapped)

    # ------------------------------------------------------------------------------------------ eager API
    def __call__(self, input_ids, pixel_values=None, grid_sizes=None, merge_sizes=None, compression_mask=None,
                 attention_mask=None, positions=None, cache: KVCache | None = None, logits_positions=None,
                 return_hidden: bool = False) -> ModelOutput:
        """Validate on the host, then run the jitted forward. Same inputs as transformers, packed visual rows."""
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2:
            raise InputError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        layout, num_kept = check_inputs(self.config, input_ids, pixel_values, grid_sizes, merge_sizes, compression_mask)
        graphdef, state = nnx.split(self)
        out = _jit_forward(graphdef, state, jnp.asarray(input_ids, jnp.int32),
                           None if pixel_values is None else jnp.asarray(pixel_values),
                           None if compression_mask is None else jnp.asarray(compression_mask, bool),
                           None if attention_mask is None else jnp.asarray(attention_mask),
                           None if positions is None else jnp.asarray(positions, jnp.int32),
                           cache, None if logits_positions is None else jnp.asarray(logits_positions, jnp.int32),
                           layout=layout, num_kept=num_kept)
        return out if return_hidden else out.replace(hidden_states=None)

    def generate(self, input_ids, *, max_new_tokens: int, **kwargs) -> np.ndarray:
        """Greedy decoding (see `cogstream_jax.model.generate.greedy_generate`)."""
        from cogstream_jax.model.generate import greedy_generate

        return greedy_generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)


def use_attention(model: VideoLlama3, impl: str = "auto", *, mesh: Mesh | None = None, interpret: bool = False,
                  chunk_size: int | None = None) -> str:
    """Set the model's attention for the devices it will run on, before tracing; returns the implementation.

    `impl` ("auto", "xla", "dense", "chunked", "splash", "cudnn") is resolved by `attention.resolve_attn_impl` for
    the platform of `mesh`'s devices (compile-only topology devices included; the default backend without a mesh)
    and the model's compute dtype; a choice the target cannot run raises `ConfigError`. `mesh` is kept for the
    splash kernel's `shard_map`; `interpret` runs the splash kernel in Pallas interpret mode (CPU tests).
    """
    target = platform_of(mesh) if mesh is not None else normalize_platform(jax.default_backend())
    resolved = resolve_attn_impl(impl, target, model.dtype, interpret=interpret)
    model.attn_impl, model.attn_mesh, model.attn_interpret = resolved, mesh, interpret
    if chunk_size is not None:
        model.attn_chunk_size = chunk_size
    return resolved


@functools.partial(jax.jit, static_argnames=("graphdef", "layout", "num_kept"))
def _jit_forward(graphdef, state, input_ids, pixel_values, compression_mask, attention_mask, positions, cache,
                 logits_positions, *, layout, num_kept):
    model = nnx.merge(graphdef, state)
    return model.forward(input_ids, pixel_values=pixel_values, layout=layout, compression_mask=compression_mask,
                         num_kept=num_kept, attention_mask=attention_mask, positions=positions, cache=cache,
                         logits_positions=logits_positions)


def refuse_dropout() -> None:
    """The eager entry points run cached jits: a `lora_dropout` key would be ignored silently, so refuse it."""
    if active_dropout_key() is not None:
        raise RuntimeError("lora_dropout is only honoured inside your own traced call of `model.forward`; the "
                           "eager model(...) / generate entry points are deterministic")


def check_inputs(config: ModelConfig, input_ids: np.ndarray, pixel_values, grid_sizes, merge_sizes,
                 compression_mask) -> tuple[VisualLayout | None, int | None]:
    """Host-side consistency checks with messages naming the tensor at fault; returns the static metadata."""
    refuse_dropout()
    n_slots = int(np.isin(input_ids, config.placeholder_ids).sum())
    if pixel_values is None:
        if n_slots:
            raise InputError(f"input_ids hold {n_slots} visual placeholders but no pixel_values were given")
        if compression_mask is not None:
            raise InputError("compression_mask given without pixel_values")
        return None, None
    if grid_sizes is None:
        raise InputError("pixel_values given without grid_sizes")
    if merge_sizes is None:
        merge_sizes = np.ones(len(np.asarray(grid_sizes).reshape(-1, 3)), np.int64)
    layout = VisualLayout.from_arrays(grid_sizes, merge_sizes)
    pv_shape = np.shape(pixel_values)
    if len(pv_shape) != 2 or pv_shape[1] != config.vision.patch_dim:
        raise InputError(f"pixel_values must be [N, {config.vision.patch_dim}], got {pv_shape}")
    layout.check_pixels(pixel_values)
    num_kept = layout.num_tokens
    if compression_mask is not None:
        mask = np.asarray(compression_mask)
        if mask.shape != (layout.num_tokens,):
            raise InputError(f"compression_mask has shape {mask.shape}; the visual input has {layout.num_tokens} "
                             "merged tokens")
        num_kept = int(mask.astype(bool).sum())
    if n_slots != num_kept:
        what = "kept visual features (compression_mask)" if compression_mask is not None else "visual features"
        raise InputError(f"input_ids hold {n_slots} visual placeholders but there are {num_kept} {what}; drop the "
                         "masked placeholders from input_ids first")
    return layout, num_kept
