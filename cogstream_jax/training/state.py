"""Train state: only the adapter's LoRA params carry optimiser state; the frozen base travels beside it.

`split_for_training` cuts an adapted model into (graphdef, LoRA params, frozen rest). The frozen state is a
separate, non-donated argument of the step, so it stays bit-identical and has no Adam moments.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cogstream_jax import lora
from cogstream_jax.model.videollama3 import VideoLlama3, use_attention
from cogstream_jax.sharding import check_heads, shard_model, state_shardings


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimiser updates done
    params: nnx.State  # the adapter's LoRAParams
    opt_state: Any
    rng: jax.Array  # uint32[2] raw key (checkpointable); dropout keys are folded from it and the step


@dataclasses.dataclass(frozen=True)
class SplitModel:
    graphdef: Any
    params: nnx.State
    frozen: nnx.State
    adapter: str


def prepare_model(model: nnx.Module, adapter: str, spec: lora.LoraSpec, *, seed: int, mesh: Mesh | None) -> None:
    """Add and activate the trainable adapter, then place every variable by its logical axes on `mesh` and bind
    the model's attention to it (`use_attention`: "auto" resolved for the mesh's platform, the splash kernel
    shard_mapped over it)."""
    if adapter not in lora.adapter_names(model):
        lora.add_adapter(model, adapter, spec, seed=seed)
    lora.set_adapter(model, adapter)
    if mesh is not None:
        shard_model(model, mesh)
        bind_attention(model, mesh)


def bind_attention(model: nnx.Module, mesh: Mesh) -> None:
    """Resolve the model's attention for `mesh`'s platform and keep the mesh for the kernels' shard_map."""
    if isinstance(model, VideoLlama3):
        check_heads(model.config.text.num_attention_heads, mesh)
        use_attention(model, model.attn_impl, mesh=mesh, interpret=model.attn_interpret)


def split_for_training(model: nnx.Module, adapter: str) -> SplitModel:
    graphdef, params, frozen = nnx.split(model, lora.lora_filter(adapter), ...)
    return SplitModel(graphdef, params, frozen, adapter)


def init_state(params: nnx.State, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Fresh optimiser state laid out like the params (jit propagates their shardings to the moments)."""
    opt_state = jax.jit(tx.init)(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      rng=jax.random.key_data(jax.random.key(seed)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def train_state_shardings(state: TrainState, params_template: nnx.State, mesh: Mesh) -> TrainState:
    """Shardings for every leaf: params by logical axes, Adam moments like their params, scalars replicated."""
    param_sh = state_shardings(params_template, mesh)
    param_struct = jax.tree.structure(params_template)

    def like_params(sub):
        if jax.tree.structure(sub) == param_struct:
            return param_sh
        return jax.tree.map(lambda _: replicated(mesh), sub)

    opt_sh = jax.tree.map(like_params, state.opt_state, is_leaf=lambda x: isinstance(x, nnx.State))
    return TrainState(step=replicated(mesh), params=param_sh, opt_state=opt_sh, rng=replicated(mesh))


def place_state(state: TrainState, shardings: TrainState) -> TrainState:
    return jax.device_put(state, shardings)
