"""The jitted training steps: pure functions of (state, frozen base, batch) with explicit shardings.

Stage 1 makes one optimiser update per call of two programs: the gradient, a `lax.scan` over the micro-batches
(leading batch axis) adding the per-token CE sums and their gradients in fp32, then dividing once by the total
number of target tokens of the whole accumulated batch (not a mean of per-micro-batch means); then `apply`, the
optimiser update, to which the state is donated.

Stage 2 QAs have different shapes (growing conversation, different visual layouts). `make_stage2_grad` takes
several QAs padded into one bucket (`stage2_buckets`), one per row split over data x fsdp, and returns the sum of
their mean answer-token losses weighted by 1 / (QAs per update); `apply` makes one update from the gradients of
an update's calls, summed. `make_qa_grad` (one QA, static `VisualLayout`, the vision tower inside the gradient) is
the earlier per-QA step, kept as the reference the bucketed step is tested against.

LoRA dropout keys derive from (state.rng, step, micro-batch index) only, so a resumed run draws the same masks.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cogstream_jax.errors import ConfigError
from cogstream_jax.model.layers import lora_dropout
from cogstream_jax.model.qwen2 import remat_policy
from cogstream_jax.model.vision import VisualLayout
from cogstream_jax.sharding import MESH_AXES
from cogstream_jax.training.losses import ce_sums
from cogstream_jax.training.state import TrainState, replicated

BATCH_AXES = ("data", "fsdp")  # mesh axes that split the rows of a micro-batch


#: the training default of `--remat` / `StepOptions.remat` (both stages; the choices: qwen2.REMAT_CHOICES)
DEFAULT_REMAT = "full"


@dataclasses.dataclass(frozen=True)
class StepOptions:
    remat: str = DEFAULT_REMAT  # decoder-layer rematerialisation: "full", "dots", "offload" or "none" (qwen2)
    dropout: bool = True  # LoRA dropout during training (off for parity checks)
    # "hash": counter-based hash masks (layers.hashed_keep_mask): identical on every mesh and process count, and
    #   about 100x cheaper than a bit generator on CPU; "threefry": jax.random.bernoulli with threefry keys (also
    #   mesh-independent, slow on CPU for big activations); "rbg": XLA's RngBitGenerator (faster than threefry,
    #   masks may depend on the sharding)
    dropout_rng: str = "hash"
    # decoder layers as one jax.lax.scan (model/scan_layers.py): one compiled layer body instead of one per layer
    scan_layers: bool = True
    # every micro-batch of the accumulating step as its own copy of the loop body: only for counting FLOPs (XLA's
    # cost analysis counts a loop's body once, whatever its trip count; compilecheck/flops.py)
    unroll_micro_batches: bool = False

    def __post_init__(self):
        remat_policy(self.remat)  # unknown policy names fail here, not at the first trace


def dropout_key(state: TrainState, options: StepOptions) -> jax.Array:
    """The update's dropout key, from the run seed and the update index only (resume draws the same masks)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if options.dropout_rng == "rbg":
        key = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")
    return key


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh, rows_axis: int = 1) -> NamedSharding:
    """Rows (axis `rows_axis`) split over data x fsdp; everything else replicated."""
    spec = [None] * rows_axis + [BATCH_AXES]
    return NamedSharding(mesh, PartitionSpec(*spec))


def check_rows_divisible(rows: int, mesh: Mesh, what: str = "micro-batch rows") -> None:
    n = data_parallel_size(mesh)
    if rows % n:
        shape = ",".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)
        raise ConfigError(f"--micro_batch_size: {what} = {rows} is not divisible by the data axes data x fsdp = {n} "
                          f"of --mesh {shape}")


def _forward_sums(graphdef, params, frozen, batch: dict[str, jax.Array], key, allowed, options: StepOptions,
                  layout: VisualLayout | None = None, num_kept: int | None = None):
    model = nnx.merge(graphdef, params, frozen)
    with lora_dropout(key if options.dropout else None, "hash" if options.dropout_rng == "hash" else "bernoulli"):
        pixels, features = batch.get("pixel_values"), None
        if "minor_frame_mask" in batch:  # event compression: minor frames' token 0 := mean of the frame's tokens
            features = pool_minor_tokens(model.encode_visual(pixels, layout), batch["minor_frame_mask"])
            pixels = None
        out = model.forward(batch["input_ids"], pixel_values=pixels, layout=layout, visual_features=features,
                            compression_mask=batch.get("compression_mask"), num_kept=num_kept,
                            attention_mask=batch.get("attention_mask"), logits_positions=batch["logits_positions"],
                            remat=options.remat)
    return ce_sums(out.logits, batch["targets"], batch["weights"], allowed)


def pool_minor_tokens(features: jax.Array, minor: jax.Array) -> jax.Array:
    """features [T * P, D], minor [T] bool -> token 0 of each minor frame replaced by its frame's mean.

    The minor-frame decision comes from the host (question-aware scoring under stop_gradient); the pooling
    itself is differentiable, as in the official compress_unimportant_events."""
    t = minor.shape[0]
    frames = features.reshape(t, features.shape[0] // t, features.shape[-1])
    pooled = frames.astype(jnp.float32).mean(axis=1).astype(frames.dtype)
    first = jnp.where(minor[:, None], pooled, frames[:, 0])
    return frames.at[:, 0].set(first).reshape(features.shape)


def _zeros_f32(tree):
    return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)


def _update(state: TrainState, grads, tx: optax.GradientTransformation):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state)


def make_stage1_grad(graphdef, *, options: StepOptions, state_sharding: TrainState, frozen_sharding, mesh: Mesh):
    """jit(stage1_grad)(state, frozen, batch, allowed) -> (grads, {"loss", "tokens"}) of one update.

    batch leaves are [micro_batches, rows, ...]; allowed: [vocab] bool (the tokens the loss ranks over) or None.
    The optimiser is a program of its own (`make_apply`), so this one depends on no schedule, learning rate or
    vocabulary mask: compile-check can compile it ahead for any run of the same shapes (`compiled_store`)."""
    def stage1_grad(state: TrainState, frozen, batch, allowed):
        key = dropout_key(state, options)
        n_micro = batch["input_ids"].shape[0]

        def micro(carry, xs):
            grads_acc, loss_acc, count_acc = carry
            mb, index = xs
            fn = lambda p: _forward_sums(graphdef, p, frozen, mb, jax.random.fold_in(key, index), allowed, options)
            (loss, count), grads = jax.value_and_grad(fn, has_aux=True)(state.params)
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
            return (grads_acc, loss_acc + loss, count_acc + count), None

        init = (_zeros_f32(state.params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, loss, count), _ = jax.lax.scan(micro, init, (batch, jnp.arange(n_micro)),
                                               unroll=n_micro if options.unroll_micro_batches else 1)
        denom = jnp.maximum(count, 1.0)
        return jax.tree.map(lambda g: g / denom, grads), {"loss": loss / denom, "tokens": count}

    return jax.jit(stage1_grad, in_shardings=(state_sharding, frozen_sharding, batch_sharding(mesh), replicated(mesh)),
                   out_shardings=(state_sharding.params, replicated(mesh)))


class AccumulatingStep:
    """One stage-1 update, step(state, frozen, batch) -> (state, metrics): the accumulated gradient
    (`make_stage1_grad`, one program per batch shape) then the optimiser update (`make_apply`; the state is
    donated). `grad` may be replaced by anything called like it (`compiled_store.ByShape`)."""

    def __init__(self, grad, apply, allowed: np.ndarray | None, mesh: Mesh):
        self.grad, self.apply = grad, apply
        self._allowed = None if allowed is None else np.asarray(allowed, bool)
        self._sharding = replicated(mesh)
        self._placed = None  # the mask on the devices, at the first call (compile-check's devices hold nothing)

    def __call__(self, state: TrainState, frozen, batch):
        if self._allowed is not None and self._placed is None:  # every process passes its copy of the same mask
            self._placed = jax.make_array_from_callback(self._allowed.shape, self._sharding,
                                                        lambda index: self._allowed[index])
        grads, metrics = self.grad(state, frozen, batch, self._placed)
        state, applied = self.apply(state, grads)
        return state, {**metrics, **applied}

    def lower(self, state, frozen, batch):
        """The gradient program lowered from (abstract) arguments (compile-check)."""
        allowed = None if self._allowed is None else jax.ShapeDtypeStruct(self._allowed.shape, jnp.bool_,
                                                                         sharding=self._sharding)
        return self.grad.lower(state, frozen, batch, allowed)


def make_accumulating_step(graphdef, tx: optax.GradientTransformation, lr_schedule: Callable, *,
                           allowed: np.ndarray | None, options: StepOptions, state_sharding: TrainState,
                           frozen_sharding, mesh: Mesh) -> AccumulatingStep:
    """step(state, frozen, batch) -> (state, metrics); batch leaves are [micro_batches, rows, ...]."""
    grad = make_stage1_grad(graphdef, options=options, state_sharding=state_sharding,
                            frozen_sharding=frozen_sharding, mesh=mesh)
    return AccumulatingStep(grad, make_apply(tx, lr_schedule, state_sharding=state_sharding, mesh=mesh), allowed,
                            mesh)


def make_qa_grad(graphdef, *, options: StepOptions, accumulation: int, state_sharding: TrainState, frozen_sharding,
                 mesh: Mesh):
    """grad(state, frozen, batch, index, layout=, num_kept=) -> (grads, loss, tokens) for ONE QA (batch 1).

    grads = d(mean answer-token CE) / accumulation, so four calls summed give the official `loss / 4` update.
    """
    def grad(state: TrainState, frozen, batch, index, layout, num_kept):
        key = jax.random.fold_in(dropout_key(state, options), index)

        def mean_loss(p):
            total, count = _forward_sums(graphdef, p, frozen, batch, key, None, options, layout, num_kept)
            return total / jnp.maximum(count, 1.0), count

        (loss, count), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32) / accumulation, grads)
        return grads, loss, count

    jitted = jax.jit(grad, static_argnums=(4, 5),
                     in_shardings=(state_sharding, frozen_sharding, replicated(mesh), replicated(mesh)),
                     out_shardings=(state_sharding.params, replicated(mesh), replicated(mesh)))

    def call(state, frozen, batch, index, layout: VisualLayout | None = None, num_kept: int | None = None):
        return jitted(state, frozen, batch, jnp.asarray(index, jnp.int32), layout, num_kept)

    def lower(state, frozen, batch, layout: VisualLayout | None = None, num_kept: int | None = None):
        """The same program lowered from (abstract) arguments, for ahead-of-time compiles (compile-check)."""
        return jitted.lower(state, frozen, batch, jax.ShapeDtypeStruct((), jnp.int32), layout, num_kept)

    call.lower = lower
    return call


def make_apply(tx: optax.GradientTransformation, lr_schedule: Callable, *, state_sharding: TrainState, mesh: Mesh):
    """jit(apply)(state, grads) -> (state, metrics): one optimiser update; the state is donated."""
    def apply(state: TrainState, grads):
        metrics = {"grad_norm": optax.tree.norm(grads), "lr": lr_schedule(state.step)}
        return _update(state, grads, tx), metrics

    return jax.jit(apply, in_shardings=(state_sharding, state_sharding.params),
                   out_shardings=(state_sharding, replicated(mesh)), donate_argnums=(0,))


def add_grads(a, b):
    return jax.tree.map(jnp.add, a, b)


add_grads_jit = jax.jit(add_grads, donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------- stage 2, bucketed
def pool_groups(projected: jax.Array, groups: jax.Array) -> jax.Array:
    """projected [U, D], groups [U] int (-1 = none) -> each row g that some rows name is replaced by the fp32 mean
    of the rows naming it (a minor frame's token 0 := the mean of its frame's tokens, `pool_minor_tokens`)."""
    u = projected.shape[0]
    sums = jax.ops.segment_sum(projected.astype(jnp.float32), groups, num_segments=u)
    counts = jax.ops.segment_sum(jnp.ones((u,), jnp.float32), groups, num_segments=u)
    pooled = (sums / jnp.maximum(counts, 1.0)[:, None]).astype(projected.dtype)
    return jnp.where((counts > 0)[:, None], pooled, projected)


def embed_with_slots(model, ids: jax.Array, slot_source: jax.Array, projected: jax.Array) -> jax.Array:
    """Token embeddings [1, L, D] with slot i (slot_source >= 0) taking projected[slot_source[i]]."""
    embeds = model.language_model.embed_tokens(ids)
    visual = projected[jnp.maximum(slot_source, 0)].astype(embeds.dtype)
    return jnp.where((slot_source >= 0)[..., None], visual, embeds)


def _row_sums(graphdef, params, frozen, row: dict[str, jax.Array], features: jax.Array, key, options: StepOptions):
    """One QA of a bucketed stage-2 batch (no batch axis) -> (CE sum, supervised count)."""
    model = nnx.merge(graphdef, params, frozen)
    with lora_dropout(key if options.dropout else None, "hash" if options.dropout_rng == "hash" else "bernoulli"):
        projected = pool_groups(model.mm_projector(features.astype(model.dtype)), row["token_group"])
        ids = row["input_ids"][None]
        embeds = embed_with_slots(model, ids, row["slot_source"][None], projected)
        positions = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
        hidden, _ = model.text_hidden(embeds, positions, row["attention_mask"][None], remat=options.remat,
                                      rows_mapped=model.attn_mesh is not None)
        logits = model.logits_at(hidden, row["logits_positions"][None])
    return ce_sums(logits, row["targets"][None], row["weights"][None])


#: arrays of one bucketed stage-2 call, all with a leading row (QA) axis split over data x fsdp
STAGE2_KEYS = ("input_ids", "attention_mask", "slot_source", "token_group", "logits_positions", "targets", "weights",
               "qa_index", "row_weight")


def make_stage2_grad(graphdef, *, options: StepOptions, state_sharding: TrainState, frozen_sharding, mesh: Mesh):
    """grad(state, frozen, batch, features) -> (grads, losses [R], counts [R]) for R QAs at once (one bucket).

    batch: `STAGE2_KEYS` arrays with a leading row axis R split over data x fsdp; features [R, U, vision hidden]:
    the frozen vision tower's output for each row's visual tokens (computed once per QA outside the gradient).
    Each row is one QA: its own loss (mean over its answer tokens) times `row_weight` (1 / QAs per update, 0 for
    an empty row), summed over rows; its LoRA-dropout key is the update's key folded with `qa_index` (the QA's
    place in the update), so a QA gets the same masks whatever row, device or bucket it lands in. Rows are vmapped
    one-QA forwards, so padding rows and buckets change nothing but the work. The vmap names the mesh axes the rows
    are split over (`spmd_axis_name`): without it the fused attention kernels' `shard_map` inside sees one row and
    every device would attend for every row, and XLA would gather the rows' activations instead of the weights.
    """
    def grad(state: TrainState, frozen, batch, features):
        key = dropout_key(state, options)

        def total_loss(p):
            def one(row, feats):
                total, count = _row_sums(graphdef, p, frozen, row, feats, jax.random.fold_in(key, row["qa_index"]),
                                         options)
                return total / jnp.maximum(count, 1.0), count

            rows = {k: batch[k] for k in STAGE2_KEYS if k != "row_weight"}
            losses, counts = jax.vmap(one, spmd_axis_name=BATCH_AXES)(rows, features)
            return jnp.sum(losses * batch["row_weight"]), (losses, counts)

        (_, (losses, counts)), grads = jax.value_and_grad(total_loss, has_aux=True)(state.params)
        return jax.tree.map(lambda g: g.astype(jnp.float32), grads), losses, counts

    rows = batch_sharding(mesh, rows_axis=0)
    jitted = jax.jit(grad, in_shardings=(state_sharding, frozen_sharding, rows, rows),
                     out_shardings=(state_sharding.params, replicated(mesh), replicated(mesh)))
    return jitted
