"""Training step numerics: the stage-1 constrained loss and LoRA gradients equal transformers + peft, the
optimiser recipes equal torch's AdamW / schedulers, and the frozen base has no optimiser state."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from cogstream_jax import lora
from cogstream_jax.sharding import make_mesh
from cogstream_jax.training import optim
from cogstream_jax.training.batching import step_batch
from cogstream_jax.training.losses import allowed_mask, ce_sums, supervised_positions
from cogstream_jax.training.setup import build_setup
from cogstream_jax.training.state import init_state
from cogstream_jax.training.step import StepOptions
from train_helpers import ALLOWED, peft_pair, random_rows, random_video_batch
from torch_reference import VOCAB


def test_supervised_positions_shift_and_pad():
    labels = np.array([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, -100]])
    pos, tgt, w = supervised_positions(labels, num_positions=4)
    assert pos.tolist() == [[1, 2, 0, 0], [0, 0, 0, 0]]
    assert tgt.tolist() == [[5, 6, 0, 0], [7, 0, 0, 0]]
    assert w.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]


def test_constrained_ce_is_softmax_over_allowed_ids_and_padding_is_finite():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 3, 40)).astype(np.float32)
    allowed = allowed_mask([3, 7, 9], 40)
    targets = np.array([[3, 7, 0], [9, 9, 0]])
    weights = np.array([[1, 1, 0], [1, 1, 0]], np.float32)
    total, count = ce_sums(logits, targets, weights, allowed)
    sub = logits[..., [3, 7, 9]]
    logp = sub - np.log(np.exp(sub).sum(-1, keepdims=True))
    idx = {3: 0, 7: 1, 9: 2}
    expect = -sum(logp[b, p, idx[int(targets[b, p])]] for b in range(2) for p in range(2))
    assert float(count) == 4 and abs(float(total) - expect) < 1e-5
    grads = jax.grad(lambda x: ce_sums(x, targets, weights, allowed)[0])(logits)
    assert np.isfinite(np.asarray(grads)).all()


@pytest.fixture(scope="module")
def stage1_reference():
    """Our loss/grads (SGD lr 1 => update = -grad) and torch+peft's on the same 2 x 2-row accumulated batch."""
    peft_model, ours, name, spec, modules = peft_pair()
    rng = np.random.default_rng(1)
    ids, labels, mask = random_rows(rng, rows=4, length=24, n_targets=5, pad=3)
    labels[2, -5:-3] = -100  # unequal target counts per micro-batch: token-weighted sums matter
    mesh = make_mesh("1,1,1", devices=jax.devices()[:1])
    setup = build_setup(ours, name, spec, optax.sgd(1.0), mesh, seed=0, options=StepOptions(dropout=False))
    before = jax.tree.map(np.asarray, setup.state.params)
    frozen_before = [np.asarray(x) for x in jax.tree.leaves(setup.frozen)]
    step = setup.accumulating_step(allowed_mask(ALLOWED, VOCAB))
    new_state, metrics = step(setup.state, setup.frozen, step_batch(ids, labels, mask, micro_batches=2))
    ours_grads = jax.tree.map(lambda b, a: b - np.asarray(a), before, new_state.params)

    torch_allowed = torch.full((VOCAB,), float("-inf"))
    torch_allowed[list(ALLOWED)] = 0.0
    total, count = 0.0, 0
    for mb in (slice(0, 2), slice(2, 4)):  # HF-style accumulation, but summed then divided once
        out = peft_model(input_ids=torch.as_tensor(ids[mb], dtype=torch.long),
                         attention_mask=torch.as_tensor(mask[mb], dtype=torch.long)).logits
        logits = (out + torch_allowed)[:, :-1]
        tgt = torch.as_tensor(labels[mb][:, 1:], dtype=torch.long)
        total = total + torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1),
                                                          ignore_index=-100, reduction="sum")
        count += int((tgt != -100).sum())
    loss = total / count
    loss.backward()
    return setup, metrics, ours_grads, float(loss.detach()), modules, name, ours, frozen_before, new_state


def test_stage1_loss_equals_peft(stage1_reference):
    _, metrics, _, torch_loss, *_ = stage1_reference
    assert abs(float(metrics["loss"]) - torch_loss) <= 1e-5
    assert float(metrics["tokens"]) == 4 * 5 - 2


def test_stage1_lora_gradients_equal_peft(stage1_reference):
    setup, _, grads, _, modules, name, ours, _, _ = stage1_reference
    model = setup.model(setup.state.__class__(step=None, params=grads, opt_state=None, rng=None))
    compared = 0
    for original, (a_var, b_var) in lora.adapter_variables(model, name).items():
        layer = modules[original]
        ga = layer.lora_A["default"].weight.grad.numpy().T
        gb = layer.lora_B["default"].weight.grad.numpy().T
        assert np.abs(np.asarray(a_var[...]) - ga).max() <= 1e-5, original
        assert np.abs(np.asarray(b_var[...]) - gb).max() <= 1e-5, original
        assert np.abs(ga).max() > 1e-4  # B != 0, so A receives a real gradient
        compared += 1
    assert compared == 7 * ours.config.text.num_hidden_layers


def test_frozen_base_is_bit_identical_and_has_no_optimizer_state(stage1_reference):
    setup, *_, frozen_before, new_state = stage1_reference
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(frozen_before, jax.tree.leaves(setup.frozen)))
    n_lora = len(jax.tree.leaves(new_state.params))
    adam = init_state(new_state.params, optax.adamw(1e-3), 0).opt_state
    n_moments = sum(x.size > 1 or x.ndim > 0 for x in jax.tree.leaves(adam))
    assert n_moments == 2 * n_lora  # mu and nu for LoRA tensors only, nothing for the frozen base


def _torch_reference_update(grads: list[np.ndarray], params: list[np.ndarray], config: optim.OptimConfig, steps: int):
    tp = [torch.nn.Parameter(torch.tensor(p)) for p in params]
    opt = torch.optim.AdamW(tp, lr=config.learning_rate, betas=(config.b1, config.b2), eps=config.eps,
                            weight_decay=config.weight_decay)
    for _ in range(steps):
        for p, g in zip(tp, grads):
            p.grad = torch.tensor(g)
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(tp, config.max_grad_norm)
        opt.step()
    return [p.detach().numpy() for p in tp]


@pytest.mark.parametrize("recipe", ["stage1", "stage2"])
def test_optimizer_matches_torch_adamw_with_clipping(recipe):
    config = optim.stage1_optim(100, 2e-4) if recipe == "stage1" else optim.stage2_optim(1, 4, 1e-4)
    config = optim.OptimConfig(0.01, 100, 0.0, config.weight_decay, config.max_grad_norm)  # constant-ish lr
    rng = np.random.default_rng(0)
    params = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5).astype(np.float32)]
    grads = [rng.standard_normal((3, 4)).astype(np.float32) * 3, rng.standard_normal(5).astype(np.float32)]
    ref = _torch_reference_update(grads, params, optim.OptimConfig(0.01, 100, 0.0, config.weight_decay,
                                                                   config.max_grad_norm), 1)
    tx = optax.chain(*([optax.clip_by_global_norm(config.max_grad_norm)] if config.max_grad_norm else []),
                     optax.adamw(0.01, eps=config.eps, weight_decay=config.weight_decay))
    new = optax.apply_updates(params, tx.update(grads, tx.init(params), params)[0])
    for a, b in zip(new, ref):
        assert np.abs(np.asarray(a) - b).max() <= 1e-6
    assert optim.make_optimizer(config) is not None


def test_schedules_match_hf_and_torch():
    from transformers import get_cosine_schedule_with_warmup

    for total in (50, 13, 1):  # 1 update: the warmup covers the whole run (HF: LR 0)
        s1 = optim.stage1_optim(total)
        assert s1.warmup_steps == math.ceil(0.08 * total)
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=s1.learning_rate)
        sched = get_cosine_schedule_with_warmup(opt, s1.warmup_steps, total)
        ours = optim.schedule(s1)
        for t in range(total):
            assert abs(float(ours(t)) - sched.get_last_lr()[0]) <= 1e-9, (total, t)
            opt.step(); sched.step()
    s2 = optim.stage2_optim(num_epochs=2, num_videos=5)
    assert s2.total_steps == 2 * 2 * 20 and s2.max_grad_norm is None and s2.weight_decay == 1e-2
    opt = torch.optim.AdamW([p], lr=s2.learning_rate)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s2.total_steps, eta_min=0)
    ours = optim.schedule(s2)
    for t in range(s2.total_steps):
        assert abs(float(ours(t)) - cos.get_last_lr()[0]) <= 1e-9, t
        opt.step(); cos.step()


def test_stage2_loss_and_gradients_equal_peft_on_a_multimodal_sample():
    """full_module (LLM + projector readout.0/.2) on a 2-frame video with a DiffFP-style compression mask."""
    peft_model, ours, name, spec, modules = peft_pair(lora.full_module_spec, seed=5)
    arrays, layout, kept, labels = random_video_batch(ours.config, seed=2)
    mesh = make_mesh("1,1,1", devices=jax.devices()[:1])
    setup = build_setup(ours, name, spec, optax.sgd(1.0), mesh, seed=0, options=StepOptions(dropout=False))
    grads, loss, count = setup.qa_grad(accumulation=1)(setup.state, setup.frozen, arrays, 0, layout, kept)

    out = peft_model(input_ids=torch.as_tensor(arrays["input_ids"], dtype=torch.long),
                     pixel_values_videos=torch.as_tensor(arrays["pixel_values"]),
                     video_grid_thw=torch.as_tensor([list(layout.grids[0])]),
                     video_merge_sizes=torch.as_tensor([2]),
                     video_compression_mask=torch.as_tensor(arrays["compression_mask"]))
    tgt = torch.as_tensor(labels[:, 1:], dtype=torch.long)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), tgt.reshape(-1),
                                            ignore_index=-100)
    ref.backward()
    assert abs(float(loss) - float(ref.detach())) <= 1e-5 and float(count) == 6
    model = setup.model(setup.state.__class__(step=None, params=grads, opt_state=None, rng=None))
    for original, (a_var, b_var) in lora.adapter_variables(model, name).items():
        layer = modules[original]
        assert np.abs(np.asarray(a_var[...]) - layer.lora_A["default"].weight.grad.numpy().T).max() <= 1e-5, original
        assert np.abs(np.asarray(b_var[...]) - layer.lora_B["default"].weight.grad.numpy().T).max() <= 1e-5, original
    proj = modules["model.mm_projector.readout.0"].lora_B["default"].weight.grad
    assert float(proj.abs().max()) > 1e-6  # the projector adapter receives gradient through the visual tokens


def test_event_compression_pooling_in_the_step_matches_the_streaming_module():
    from flax import nnx

    from cogstream_jax.inference.events import pool_minor_frames
    from cogstream_jax.model.videollama3 import VideoLlama3
    from cogstream_jax.training.step import pool_minor_tokens
    from train_helpers import small_vocab_config

    config = small_vocab_config()
    features = jax.random.normal(jax.random.key(0), (3 * 4, 16))
    minor = np.array([False, True, True])
    assert np.array_equal(np.asarray(pool_minor_tokens(features, minor)),
                          np.asarray(pool_minor_frames(features, [1, 2], 4)))

    arrays, layout, _, _ = random_video_batch(config, seed=4, frames=3)
    mask = np.ones(layout.num_tokens, bool)
    mask[[5, 6, 7, 9, 10, 11]] = False  # frames 1 and 2 keep only token 0 (minor)
    ids = arrays["input_ids"][0].tolist()
    first = ids.index(config.video_token_id)
    kept = int(mask.sum())
    n_slots = sum(i == config.video_token_id for i in ids)
    ids = ids[:first] + [config.video_token_id] * kept + ids[first + n_slots:]
    from cogstream_jax.training.losses import supervised_positions

    labels = np.full((1, len(ids)), -100)
    labels[0, -6:] = ids[-6:]
    pos, tgt, w = supervised_positions(labels)
    batch = {**arrays, "input_ids": np.asarray([ids], np.int32), "attention_mask": np.ones((1, len(ids)), np.int32),
             "compression_mask": mask, "logits_positions": pos, "targets": tgt, "weights": w}
    model = VideoLlama3(config, rngs=nnx.Rngs(0))
    setup = build_setup(model, lora.FULL_MODULE, lora.full_module_spec(config), optax.sgd(1.0),
                        make_mesh("1,1,1", devices=jax.devices()[:1]), seed=0, options=StepOptions(dropout=False))
    grad = setup.qa_grad(accumulation=1)
    _, plain, _ = grad(setup.state, setup.frozen, batch, 0, layout, kept)
    _, pooled, _ = grad(setup.state, setup.frozen, {**batch, "minor_frame_mask": np.array([False, True, True])}, 0,
                        layout, kept)
    view = setup.model()
    feats = pool_minor_frames(view.encode_visual(jnp.asarray(arrays["pixel_values"]), layout), [1, 2], 4)
    out = view.forward(jnp.asarray(batch["input_ids"]), visual_features=feats, compression_mask=jnp.asarray(mask),
                       num_kept=kept, attention_mask=jnp.asarray(batch["attention_mask"]),
                       logits_positions=jnp.asarray(pos))
    total, count = ce_sums(out.logits, tgt, w)
    assert abs(float(pooled) - float(total / count)) <= 1e-5 and abs(float(pooled) - float(plain)) > 1e-6


def test_stage2_batch_applies_injected_minor_frames():
    from cogstream_jax.data.dataset import load_dataset
    from cogstream_jax.data.stage2_samples import stage2_episode
    from cogstream_jax.data.processor import Processor
    from cogstream_jax.data.synth import sample_dataset_dir
    from cogstream_jax.reference_files import bundled_model_dir
    from cogstream_jax.training.stage2_batches import build_stage2_batch

    processor = Processor.from_pretrained(bundled_model_dir())
    sample = stage2_episode(load_dataset(sample_dataset_dir()).videos[0], 0)[1]
    plain = build_stage2_batch(sample, processor)
    seen = []
    compressed = build_stage2_batch(sample, processor, minor_frames_fn=lambda out, q: seen.append(q) or (2, 3))
    assert seen == [sample.question]
    per_frame = plain.layout.num_tokens // plain.layout.grids[0][0]
    frames = compressed.arrays["compression_mask"].reshape(-1, per_frame)
    assert frames[2].tolist() == frames[3].tolist() == [True] + [False] * (per_frame - 1)
    assert compressed.arrays["minor_frame_mask"].tolist()[:4] == [False, False, True, True]
    assert compressed.num_kept < plain.num_kept
    n_slots = int((compressed.arrays["input_ids"] == 151665).sum())
    assert n_slots == compressed.num_kept


@pytest.mark.parametrize("kind", ["rbg", "hash"])
def test_dropout_rng_is_deterministic_and_active(kind):
    from flax import nnx

    from cogstream_jax.model.videollama3 import VideoLlama3
    from train_helpers import small_vocab_config

    config = small_vocab_config()
    ids, labels, mask = random_rows(np.random.default_rng(3), rows=2, length=16, n_targets=3)
    batch = step_batch(ids, labels, mask, micro_batches=1)
    results = {}
    for rng_kind, dropout in ((kind, True), (kind, True), ("threefry", False)):
        model = VideoLlama3(config, rngs=nnx.Rngs(0))
        spec = lora.language_module_spec(config)
        setup = build_setup(model, lora.LANGUAGE_MODULE, spec, optax.sgd(1.0),
                            make_mesh("1,1,1", devices=jax.devices()[:1]), seed=0,
                            options=StepOptions(dropout=dropout, dropout_rng=rng_kind))
        allowed = allowed_mask(ALLOWED, config.text.vocab_size)
        state, _ = setup.accumulating_step(allowed)(setup.state, setup.frozen, batch)
        results.setdefault((rng_kind, dropout), []).append(np.concatenate([np.ravel(x) for x in
                                                                           jax.tree.leaves(state.params)]))
    first, second = results[(kind, True)]
    assert np.array_equal(first, second)
    assert np.abs(first - results[("threefry", False)][0]).max() > 1e-7


def test_hashed_dropout_masks_keep_the_rate_and_ignore_the_mesh():
    from jax.sharding import NamedSharding, PartitionSpec

    from cogstream_jax.model.layers import hashed_keep_mask

    shape = (4, 64, 96)
    key = jax.random.key(5)
    masks = jax.jit(lambda k: hashed_keep_mask(k, shape, 0.9))
    single = np.asarray(masks(key))
    assert abs(single.mean() - 0.9) < 0.01
    assert not np.array_equal(single, np.asarray(masks(jax.random.key(6))))
    assert not np.array_equal(single[0], single[1])  # no repetition along the rows
    mesh = make_mesh("2,2,2")
    sharded = jax.jit(lambda k: hashed_keep_mask(k, shape, 0.9),
                      out_shardings=NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "tensor")))(key)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(sharded), single)
