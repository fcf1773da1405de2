"""Wire a model, an adapter and an optimiser into a sharded train state and its jitted steps."""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from cogstream_jax import lora
from cogstream_jax.sharding import state_shardings
from cogstream_jax.training import step as steps
from cogstream_jax.training.optim import OptimConfig, make_optimizer, schedule
from cogstream_jax.training.state import (SplitModel, TrainState, bind_attention, init_state, place_state,
                                          prepare_model, split_for_training, train_state_shardings)


@dataclasses.dataclass
class TrainSetup:
    mesh: Mesh
    split: SplitModel
    state: TrainState
    state_sharding: TrainState
    frozen_sharding: nnx.State
    tx: optax.GradientTransformation
    lr_schedule: Callable
    options: steps.StepOptions

    @property
    def frozen(self) -> nnx.State:
        return self.split.frozen

    def accumulating_step(self, allowed: np.ndarray | None):
        return steps.make_accumulating_step(self.split.graphdef, self.tx, self.lr_schedule, allowed=allowed,
                                            options=self.options, state_sharding=self.state_sharding,
                                            frozen_sharding=self.frozen_sharding, mesh=self.mesh)

    def qa_grad(self, accumulation: int):
        return steps.make_qa_grad(self.split.graphdef, options=self.options, accumulation=accumulation,
                                  state_sharding=self.state_sharding, frozen_sharding=self.frozen_sharding,
                                  mesh=self.mesh)

    def apply(self):
        return steps.make_apply(self.tx, self.lr_schedule, state_sharding=self.state_sharding, mesh=self.mesh)

    def model(self, state: TrainState | None = None) -> nnx.Module:
        """A model view with the given (default: current) LoRA params, e.g. for generation or saving."""
        state = state or self.state
        return nnx.merge(self.split.graphdef, state.params, self.split.frozen)


def _optimizer(optim: OptimConfig | optax.GradientTransformation) -> tuple[optax.GradientTransformation, Callable]:
    if isinstance(optim, OptimConfig):
        return make_optimizer(optim), schedule(optim)
    return optim, (lambda count: jax.numpy.zeros((), jax.numpy.float32))


def build_setup(model: nnx.Module, adapter: str, spec: lora.LoraSpec, optim: OptimConfig | optax.GradientTransformation,
                mesh: Mesh, *, seed: int, options: steps.StepOptions = steps.StepOptions()) -> TrainSetup:
    """Add/activate the adapter, shard everything on `mesh`, create the optimiser state (LoRA params only)."""
    prepare_model(model, adapter, spec, seed=seed, mesh=mesh)
    model.scan_layers = options.scan_layers
    split = split_for_training(model, adapter)
    tx, lr = _optimizer(optim)
    state = init_state(split.params, tx, seed)
    state_sh = train_state_shardings(state, split.params, mesh)
    state = place_state(state, state_sh)
    return TrainSetup(mesh, split, state, state_sh, state_shardings(split.frozen, mesh), tx, lr, options)


def with_shardings(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying the matching leaf of `shardings` (a tree of NamedShardings)."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                              for x, s in zip(leaves, jax.tree.leaves(shardings))])


def abstract_setup(build_model: Callable[[], nnx.Module], adapter: str, spec: lora.LoraSpec,
                   optim: OptimConfig | optax.GradientTransformation, mesh: Mesh, *, seed: int,
                   options: steps.StepOptions = steps.StepOptions()) -> TrainSetup:
    """`build_setup` without memory: every array is a ShapeDtypeStruct carrying its sharding on `mesh` (whose
    devices may be compile-only), so the setup's jitted steps can be lowered and compiled ahead of time."""
    def build():
        model = build_model()
        prepare_model(model, adapter, spec, seed=seed, mesh=None)
        return model

    model = nnx.eval_shape(build)
    bind_attention(model, mesh)
    model.scan_layers = options.scan_layers
    split = split_for_training(model, adapter)
    tx, lr = _optimizer(optim)
    state = jax.eval_shape(lambda p: init_state(p, tx, seed), split.params)
    state_sh = train_state_shardings(state, split.params, mesh)
    frozen_sh = state_shardings(split.frozen, mesh)
    state = with_shardings(state, state_sh)
    split = dataclasses.replace(split, params=state.params, frozen=with_shardings(split.frozen, frozen_sh))
    return TrainSetup(mesh, split, state, state_sh, frozen_sh, tx, lr, options)
