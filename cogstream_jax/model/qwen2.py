"""Qwen2 decoder (spec videollama3.md section 3) with a functional KV cache.

The cache is a pytree of fixed-size arrays passed in and returned, so prefill and decode are pure functions
that jit once per shape and can donate the cache. Causality uses cache slot indices; RoPE uses the caller's
positions, so left-padded batches and compressed sequences both work.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from cogstream_jax.config import TextConfig
from cogstream_jax.model.attention import Impl, MaskSpec, apply_rope, attend, text_rope
from cogstream_jax.model.layers import Embed, Linear, RMSNorm
from cogstream_jax.model.scan_layers import run_layers
from cogstream_jax.sharding import constrain_rows


#: the name of each decoder layer's input (`checkpoint_name`): what the "offload" policy moves to host memory
LAYER_INPUT = "decoder_layer_input"

#: remat policy names (`--remat`): what each decoder layer keeps for the backward pass ("none": no remat, every
#: activation the backward pass needs is kept)
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only the layer's inputs, recompute the whole layer
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # also keep the projection matmul outputs
    # as full, but the layer inputs wait for the backward pass in host memory (pinned_host), not on the device
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[LAYER_INPUT],
        offload_src="device", offload_dst="pinned_host"),
}
REMAT_CHOICES = ("full", "dots", "offload", "none")


def remat_policy(remat: bool | str | None):
    """The `jax.checkpoint` policy of a remat setting, or None for no remat (`False`, None or "none"). `True` means
    "full"; unknown names raise with the list of valid ones."""
    if remat is False or remat is None or remat == "none":
        return None
    name = "full" if remat is True else remat
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; choose from {list(REMAT_CHOICES)}")
    return REMAT_POLICIES[name]


def checkpointed(module: nnx.Module, fn, policy, *args):
    """`fn(module, *args)` under `jax.checkpoint(policy=...)` as a pure function of (module state, args): the module
    is split outside and merged inside, so it works inside any outer transform (`jax.value_and_grad` over split
    params, `jax.lax.scan`), unlike `nnx.remat`, which writes the state back into the caller's Variables. `fn`
    must not mutate the module."""
    graphdef, state = nnx.split(module)
    pure = lambda st, *a: fn(nnx.merge(graphdef, st), *a)
    return jax.checkpoint(pure, policy=policy)(state, *args)


@struct.dataclass
class KVCache:
    """k/v [layers, B, S, kv_heads, head_dim]; `valid` [B, S] marks written, non-padding slots; `index` = next slot."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, cfg: TextConfig, batch: int, length: int, dtype=jnp.float32) -> "KVCache":
        shape = (cfg.num_hidden_layers, batch, length, cfg.num_key_value_heads, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, length), bool), index=jnp.zeros((), jnp.int32))

    @property
    def length(self) -> int:
        return self.k.shape[2]


@dataclasses.dataclass(frozen=True)
class _Step:
    """Per-call attention context shared by all layers."""

    cos: jax.Array
    sin: jax.Array
    mask: MaskSpec
    impl: Impl
    chunk_size: int
    fresh: bool = False  # the cache was empty: attend over this call's keys only
    mesh: Mesh | None = None  # what the splash kernel is shard_mapped over
    interpret: bool = False  # Pallas interpret mode (splash on CPU, tests)
    rows_mapped: bool = False  # one row of a vmap over rows split by spmd_axis_name (`sharding.constrain_rows`)

    def pin(self, x: jax.Array, last: str | None = None, units: dict[str, int] | None = None) -> jax.Array:
        return constrain_rows(x, self.mesh, last, rows_mapped=self.rows_mapped, units=units)


class Qwen2Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, param_dtype, dtype):
        d, hd = cfg.hidden_size, cfg.head_dim
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        kw["units"] = (("q_heads", hd), ("kv_heads", hd))  # heads are never split across tensor ranks
        self.q_proj = Linear(d, cfg.num_attention_heads * hd, use_bias=True, axes=("embed", "q_heads"), **kw)
        self.k_proj = Linear(d, cfg.num_key_value_heads * hd, use_bias=True, axes=("embed", "kv_heads"), **kw)
        self.v_proj = Linear(d, cfg.num_key_value_heads * hd, use_bias=True, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Linear(cfg.num_attention_heads * hd, d, use_bias=False, axes=("q_heads", "embed"), **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd

    def __call__(self, x: jax.Array, step: _Step, kv: tuple[jax.Array, jax.Array] | None, index: jax.Array | None,
                 layer: int = 0):
        """`kv` holds every layer's cache [layers, B, S, K, D]; this layer writes its slice in place."""
        b, t, _ = x.shape
        q = apply_rope(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), step.cos, step.sin)
        k = apply_rope(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), step.cos, step.sin)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        new_kv = None
        if kv is not None:  # write this step's keys/values at slots [index, index + t)
            ck = jax.lax.dynamic_update_slice(kv[0], k[None].astype(kv[0].dtype), (layer, 0, index, 0, 0))
            cv = jax.lax.dynamic_update_slice(kv[1], v[None].astype(kv[1].dtype), (layer, 0, index, 0, 0))
            new_kv = (ck, cv)
            if not step.fresh:
                k, v = ck[layer].astype(q.dtype), cv[layer].astype(q.dtype)
        out = attend(q, k, v, step.mask, impl=step.impl, chunk_size=step.chunk_size, mesh=step.mesh,
                     interpret=step.interpret)
        out = step.pin(out.reshape(b, t, -1), "q_heads", {"q_heads": self.head_dim})
        return self.o_proj(out), new_kv


class Qwen2MLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, param_dtype, dtype):
        kw = dict(use_bias=False, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array, step: _Step | None = None) -> jax.Array:
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h if step is None else step.pin(h, "mlp"))


class Qwen2DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, param_dtype, dtype):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Qwen2Attention(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = Qwen2MLP(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)

    def __call__(self, x, step: _Step, kv, index, layer: int = 0):
        x = checkpoint_name(x, LAYER_INPUT)  # every later use reads the named copy, so offloading it frees the device
        h, new_kv = self.self_attn(self.input_layernorm(x), step, kv, index, layer)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x), step), new_kv


class Qwen2Model(nnx.Module):
    """Embedding, decoder layers and the final norm (the lm_head lives on the top-level model)."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32):
        self.config = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.layers = nnx.List([Qwen2DecoderLayer(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
                                for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, embeds: jax.Array, positions: jax.Array, attention_mask: jax.Array | None,
                 cache: KVCache | None, *, cache_is_empty: bool = False, impl: Impl = "auto",
                 chunk_size: int = 512, remat: bool | str | None = False, mesh: Mesh | None = None,
                 interpret: bool = False, scan: bool = False, segment_ids: jax.Array | None = None,
                 rows_mapped: bool = False) -> tuple[jax.Array, KVCache | None]:
        """embeds [B, T, D], positions [B, T], attention_mask [B, T] (1 = token) -> (hidden [B, T, D], cache).

        `segment_ids` [B, T] (no cache): sequences packed into one row attend only within their segment (give
        each its own positions from 0 to match separate rows). `rows_mapped`: this is one row of a
        `jax.vmap(spmd_axis_name=...)` over rows split across devices (stage 2): activations are pinned per row.

        `scan` (static): the layers run as one `jax.lax.scan` (model/scan_layers.py: one compiled layer body).

        `cache_is_empty` (static) marks a prefill into a fresh cache: attention then runs over this call's keys
        only (plain causal, fused kernels) while the cache is still written.
        """
        b, t, _ = embeds.shape
        valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        cos, sin = text_rope(positions, self.config.head_dim, self.config.rope_theta)
        index, new_valid = None, None
        if cache is None or cache_is_empty:
            slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            mask = MaskSpec(causal=True, q_index=slots, kv_index=slots, aligned=True,
                            kv_valid=None if attention_mask is None else valid, segments=segment_ids)
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed sequences) need a call without a KV cache")
        if cache is not None and cache_is_empty:
            index = jnp.zeros((), jnp.int32)
            new_valid = jax.lax.dynamic_update_slice(jnp.zeros_like(cache.valid), valid, (0, 0))
        elif cache is not None:
            index = cache.index
            new_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, index))
            q_slots = index + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            kv_slots = jnp.broadcast_to(jnp.arange(cache.length, dtype=jnp.int32), (b, cache.length))
            mask = MaskSpec(causal=True, q_index=q_slots, kv_index=kv_slots, kv_valid=new_valid)
        step = _Step(cos, sin, mask, impl, chunk_size, fresh=cache_is_empty, mesh=mesh, interpret=interpret,
                     rows_mapped=rows_mapped)
        kv = None if cache is None else (cache.k, cache.v)
        policy = remat_policy(remat)

        def run(layer, carry, i):
            x, kv = carry
            if policy is not None:
                x, kv = checkpointed(layer, lambda lyr, y, c: lyr(y, step, c, index, i), policy, x, kv)
            else:
                x, kv = layer(x, step, kv, index, i)
            return step.pin(x), kv

        x, kv = run_layers(self.layers, run, (embeds, kv), scan=scan)
        x = self.norm(x)
        if cache is None:
            return x, None
        return x, KVCache(k=kv[0], v=kv[1], valid=new_valid, index=index + t)
