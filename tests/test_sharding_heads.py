"""Tensor parallelism never splits an attention head: query heads must divide the tensor axis (one-line error
naming --mesh), GQA kv heads shard when they divide it and are otherwise replicated; the training default mesh
is FSDP over every device; activations are constrained to (data, fsdp) rows at decoder-layer boundaries."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from cogstream_jax import lora
from cogstream_jax.config import tiny
from cogstream_jax.errors import ConfigError
from cogstream_jax.model.videollama3 import VideoLlama3
from cogstream_jax.sharding import constrain_rows, logical_to_spec, make_mesh
from cogstream_jax.training import run_common
from cogstream_jax.training.optim import stage2_optim
from cogstream_jax.training.setup import abstract_setup

# Qwen2.5-7B's head layout (28 query heads, 4 kv heads) at a small head width
GQA = dataclasses.replace(tiny(vocab_size=512), text=dataclasses.replace(
    tiny().text, vocab_size=512, hidden_size=112, num_attention_heads=28, num_key_value_heads=4, head_dim=4,
    intermediate_size=64))


def _specs(mesh_text: str) -> dict[str, P]:
    setup = abstract_setup(lambda: VideoLlama3(GQA, rngs=nnx.Rngs(0)), lora.FULL_MODULE,
                           lora.full_module_spec(GQA), stage2_optim(1, 1), make_mesh(mesh_text), seed=0)
    flat = [*nnx.to_flat_state(setup.frozen_sharding), *nnx.to_flat_state(setup.state_sharding.params)]
    return {"/".join(map(str, k)): v.spec for k, v in flat}


def test_kv_heads_shard_when_they_divide_the_tensor_axis_and_stay_whole_otherwise():
    on4 = _specs("2,1,4")  # 28 / 4 query heads, 4 / 4 kv heads
    layer = "language_model/layers/0/self_attn/"
    assert on4[layer + "q_proj/kernel"] == P(None, "tensor") and on4[layer + "k_proj/kernel"] == P(None, "tensor")
    assert on4[layer + "o_proj/kernel"] == P("tensor")
    assert on4[layer + "k_proj/adapters/full_module/lora_b"] == P(None, "tensor")
    on2 = _specs("1,4,2")
    assert on2[layer + "v_proj/kernel"] == P("fsdp", "tensor")
    # 16 / 4 heads of 4 would split 112 columns evenly per rank, but kv 4 heads x 4 = 16 columns over tensor=8
    # would cut heads in halves: the unit rule keeps them replicated
    assert logical_to_spec(("embed", "kv_heads"), (112, 16), make_mesh("1,1,8"), units={"kv_heads": 4}) == P()
    assert logical_to_spec(("embed", "kv_heads"), (112, 16), make_mesh("1,1,8")) == P(None, "tensor")


def test_query_heads_that_do_not_divide_the_tensor_axis_are_a_one_line_error():
    with pytest.raises(ConfigError, match=r"--mesh tensor=8 does not divide the model's 28 query heads; use tensor "
                                          r"in \[1, 2, 4, 7, 14, 28\]"):
        _specs("1,1,8")


def test_tiny_meshes_keep_working_with_replicated_kv_and_vision_heads():
    mesh = make_mesh("1,1,8")  # tiny: 8 query heads, 4 kv heads, vision 4 heads of 8
    setup = abstract_setup(lambda: VideoLlama3(tiny(), rngs=nnx.Rngs(0)), lora.FULL_MODULE,
                           lora.full_module_spec(tiny()), stage2_optim(1, 1), mesh, seed=0)
    specs = {"/".join(map(str, k)): v.spec for k, v in nnx.to_flat_state(setup.frozen_sharding)}
    assert specs["language_model/layers/0/self_attn/q_proj/kernel"] == P(None, "tensor")
    assert specs["language_model/layers/0/self_attn/k_proj/kernel"] == P()
    assert specs["vision_encoder/encoder/layers/0/self_attn/q_proj/kernel"] == P()


def test_training_default_mesh_is_fsdp_over_all_devices():
    args = run_common.build_common_parser("x").parse_args(["--model_path", "tiny", "--output_dir", "o"])
    assert dict(make_mesh(args.mesh).shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}


def test_rows_constraint_places_activations_and_changes_nothing():
    mesh = make_mesh("2,2,2")
    x = jnp.arange(8 * 3 * 4, dtype=jnp.float32).reshape(8, 3, 4)
    out = jax.jit(lambda y: constrain_rows(y * 2, mesh))(x)
    assert out.sharding.spec == P(("data", "fsdp")) and np.array_equal(out, 2 * x)
    odd = jax.jit(lambda y: constrain_rows(y, mesh))(x[:3])  # 3 rows do not divide 4: left to XLA
    assert np.array_equal(odd, x[:3])
    assert constrain_rows(x, None) is x
