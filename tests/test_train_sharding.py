"""Sharded training equals single-device training: one stage-1 update (accumulating step) and one stage-2
update (per-QA grad + apply) on meshes (data, fsdp, tensor) of 8 fake CPU devices, with LoRA dropout on.
Parameters carry the PartitionSpecs of a hand-written table."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from cogstream_jax import lora
from cogstream_jax.errors import ConfigError
from cogstream_jax.model.videollama3 import VideoLlama3
from cogstream_jax.sharding import make_mesh
from cogstream_jax.training import optim
from cogstream_jax.training.batching import step_batch
from cogstream_jax.training.losses import allowed_mask
from cogstream_jax.training.setup import build_setup
from cogstream_jax.training.step import check_rows_divisible
from train_helpers import ALLOWED, random_rows, random_video_batch, small_vocab_config

MESHES = ["8,1,1", "1,4,2", "2,2,2"]  # data only; fsdp x tensor; all three (2,4,1 adds nothing new)
CONFIG = small_vocab_config()

# logical axes -> (data=2, fsdp=2, tensor=2) by the default rules, written out by hand
EXPECTED_2_2_2 = {
    "language_model/embed_tokens/embedding": P("tensor", "fsdp"),
    "language_model/layers/0/self_attn/q_proj/kernel": P("fsdp", "tensor"),
    "language_model/layers/0/self_attn/q_proj/bias": P("tensor"),
    "language_model/layers/0/self_attn/k_proj/kernel": P("fsdp", "tensor"),
    "language_model/layers/0/self_attn/o_proj/kernel": P("tensor", "fsdp"),
    "language_model/layers/0/mlp/gate_proj/kernel": P("fsdp", "tensor"),
    "language_model/layers/0/mlp/down_proj/kernel": P("tensor", "fsdp"),
    "language_model/layers/0/input_layernorm/weight": P(),
    "language_model/norm/weight": P(),
    "lm_head/kernel": P("fsdp", "tensor"),
    "mm_projector/readout/0/kernel": P("fsdp", "tensor"),
    "mm_projector/readout/2/kernel": P("tensor", "fsdp"),
    "vision_encoder/embeddings/patch_embedding/kernel": P(None, "fsdp"),
    # LoRA: A follows the base input axis, B the output axis, rank replicated
    "language_model/layers/0/self_attn/q_proj/adapters/full_module/lora_a": P("fsdp"),
    "language_model/layers/0/self_attn/q_proj/adapters/full_module/lora_b": P(None, "tensor"),
    "language_model/layers/1/mlp/down_proj/adapters/full_module/lora_a": P("tensor"),
    "language_model/layers/1/mlp/down_proj/adapters/full_module/lora_b": P(None, "fsdp"),
    "mm_projector/readout/2/adapters/full_module/lora_a": P("tensor"),
}


def _flat(state) -> dict[str, np.ndarray]:
    return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(state)}


def _run(mesh_text: str, stage1_batch, video):
    mesh = make_mesh(mesh_text, devices=jax.devices()[:1] if mesh_text == "1,1,1" else None)
    out = {}
    model = VideoLlama3(CONFIG, rngs=nnx.Rngs(0))
    no_warmup = optim.OptimConfig(2e-4, 10, max_grad_norm=0.5)  # stage 1's first warmup lr is 0: no update
    s1 = build_setup(model, lora.LANGUAGE_MODULE, lora.language_module_spec(CONFIG), no_warmup, mesh, seed=0)
    out["stage1_init"] = _flat(s1.state.params)
    state, metrics = s1.accumulating_step(allowed_mask(ALLOWED, CONFIG.text.vocab_size))(s1.state, s1.frozen,
                                                                                         stage1_batch)
    out["stage1"] = (float(metrics["loss"]), _flat(state.params))
    model = VideoLlama3(CONFIG, rngs=nnx.Rngs(0))
    s2 = build_setup(model, lora.FULL_MODULE, lora.full_module_spec(CONFIG), optim.stage2_optim(1, 4), mesh, seed=0)
    out["stage2_init"] = _flat(s2.state.params)
    arrays, layout, kept, _ = video
    grads, loss, _ = s2.qa_grad(accumulation=2)(s2.state, s2.frozen, arrays, 0, layout=layout, num_kept=kept)
    grads2, loss2, _ = s2.qa_grad(accumulation=2)(s2.state, s2.frozen, arrays, 1, layout=layout, num_kept=kept)
    state2, _ = s2.apply()(s2.state, jax.tree.map(lambda a, b: a + b, grads, grads2))
    out["stage2"] = (float(loss) + float(loss2), _flat(state2.params))
    out["specs"] = {"/".join(map(str, k)): v[...].sharding.spec for k, v in nnx.to_flat_state(nnx.state(model))}
    out["frozen_devices"] = len(s2.frozen["lm_head"]["kernel"][...].sharding.device_set)
    return out


@pytest.fixture(scope="module")
def inputs():
    ids, labels, mask = random_rows(np.random.default_rng(0), rows=16, length=32, n_targets=4, pad=5)
    ids[ids >= CONFIG.text.vocab_size] = 1
    return step_batch(ids, labels, mask, micro_batches=2), random_video_batch(CONFIG)


@pytest.fixture(scope="module")
def reference(inputs):
    return _run("1,1,1", *inputs)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_text", MESHES)
def test_sharded_update_equals_single_device(mesh_text, inputs, reference):
    got = _run(mesh_text, *inputs)
    assert got["frozen_devices"] > 1
    for stage in ("stage1", "stage2"):
        ref_loss, ref_params = reference[stage]
        loss, params = got[stage]
        assert np.isfinite(loss) and abs(loss - ref_loss) <= 1e-5, (stage, loss, ref_loss)
        assert params.keys() == ref_params.keys()
        changed = 0
        for key, value in params.items():
            assert np.abs(value - ref_params[key]).max() <= 1e-5, (stage, key)
            changed += bool(np.abs(value - got[f"{stage}_init"][key]).max() > 0)
        assert changed >= len(params) // 2  # every B moves (A has zero gradient while B = 0)
    if mesh_text == "2,2,2":
        for key, spec in EXPECTED_2_2_2.items():
            assert got["specs"][key] == spec, key


def test_rows_not_divisible_by_data_axes_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"not divisible by the data axes data x fsdp = 8"):
        check_rows_divisible(4, make_mesh("8,1,1"))
