"""The real VideoLLaMA3-7B index (779 keys, no weights) against an abstractly built 7B model (no memory used).

Expected checkpoint shapes come from spec section 7.1, written here as patterns over the config's dimensions, so
this checks the key table, the transposes and the model's parameter shapes against the released checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from cogstream_jax.config import ModelConfig, videollama3_7b
from cogstream_jax.errors import WeightError
from cogstream_jax.weights.assign import param_leaves
from cogstream_jax.weights.keys import detect_layout, hf_key_table
from cogstream_jax.weights.loader import abstract_model, check_headers
from cogstream_jax.weights.safetensors_io import TensorInfo


def spec_shapes(c: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(key regex, PyTorch shape) rows of spec 7.1, from the config's dimensions."""
    v, t = c.vision, c.text
    kv = t.num_key_value_heads * t.head_dim
    return [
        (r"model\.vision_encoder\.embeddings\.patch_embedding\.weight", (v.hidden_size, 3, 14, 14)),
        (r"model\.vision_encoder\.embeddings\.patch_embedding\.bias", (v.hidden_size,)),
        (r"model\.vision_encoder\.encoder\.layers\.\d+\.layer_norm[12]\.(weight|bias)", (v.hidden_size,)),
        (r"model\.vision_encoder\.encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj\.weight",
         (v.hidden_size, v.hidden_size)),
        (r"model\.vision_encoder\.encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj\.bias", (v.hidden_size,)),
        (r"model\.vision_encoder\.encoder\.layers\.\d+\.mlp\.fc1\.weight", (v.intermediate_size, v.hidden_size)),
        (r"model\.vision_encoder\.encoder\.layers\.\d+\.mlp\.fc1\.bias", (v.intermediate_size,)),
        (r"model\.vision_encoder\.encoder\.layers\.\d+\.mlp\.fc2\.weight", (v.hidden_size, v.intermediate_size)),
        (r"model\.vision_encoder\.encoder\.layers\.\d+\.mlp\.fc2\.bias", (v.hidden_size,)),
        (r"model\.vision_encoder\.post_layernorm\.(weight|bias)", (v.hidden_size,)),
        (r"model\.mm_projector\.readout\.0\.weight", (t.hidden_size, v.hidden_size)),
        (r"model\.mm_projector\.readout\.[02]\.bias", (t.hidden_size,)),
        (r"model\.mm_projector\.readout\.2\.weight", (t.hidden_size, t.hidden_size)),
        (r"model\.embed_tokens\.weight", (t.vocab_size, t.hidden_size)),
        (r"model\.layers\.\d+\.(input|post_attention)_layernorm\.weight", (t.hidden_size,)),
        (r"model\.layers\.\d+\.self_attn\.q_proj\.weight", (t.num_attention_heads * t.head_dim, t.hidden_size)),
        (r"model\.layers\.\d+\.self_attn\.q_proj\.bias", (t.num_attention_heads * t.head_dim,)),
        (r"model\.layers\.\d+\.self_attn\.[kv]_proj\.weight", (kv, t.hidden_size)),
        (r"model\.layers\.\d+\.self_attn\.[kv]_proj\.bias", (kv,)),
        (r"model\.layers\.\d+\.self_attn\.o_proj\.weight", (t.hidden_size, t.num_attention_heads * t.head_dim)),
        (r"model\.layers\.\d+\.mlp\.(gate|up)_proj\.weight", (t.intermediate_size, t.hidden_size)),
        (r"model\.layers\.\d+\.mlp\.down_proj\.weight", (t.hidden_size, t.intermediate_size)),
        (r"model\.norm\.weight", (t.hidden_size,)),
        (r"lm_head\.weight", (t.vocab_size, t.hidden_size)),
    ]


def expected_shape(key: str, config: ModelConfig) -> tuple[int, ...]:
    matches = [shape for pattern, shape in spec_shapes(config) if re.fullmatch(pattern, key)]
    assert len(matches) == 1, f"{key}: matched {len(matches)} spec rows"
    return matches[0]


@pytest.fixture(scope="module")
def index(reference_dir):
    return json.loads((reference_dir / "model.safetensors.index.json").read_text())


@pytest.fixture(scope="module")
def config(reference_dir):
    """The released config.json (equal to the `videollama3_7b()` preset, checked below)."""
    return ModelConfig.from_hf_config(reference_dir)


@pytest.fixture(scope="module")
def leaves(config):
    """{our path: Variable holding a ShapeDtypeStruct} of an abstract bf16 7B model."""
    return param_leaves(nnx.state(abstract_model(config, jnp.bfloat16, jnp.bfloat16), nnx.Param))


def test_real_config_equals_the_preset(reference_dir):
    assert ModelConfig.from_hf_config(reference_dir / "config.json") == videollama3_7b()


def test_every_released_key_maps_to_one_parameter_of_the_implied_shape(index, config, leaves):
    keys = list(index["weight_map"])
    assert len(keys) == 779 and detect_layout(keys) == "original"
    assert all(isinstance(v.get_value(), jax.ShapeDtypeStruct) for v in leaves.values())  # nothing allocated
    table = hf_key_table(config, "original")
    assert set(table) == set(keys)
    our_paths = [table[k].our_path for k in keys]
    assert len(set(our_paths)) == len(our_paths) == len(leaves)  # each parameter covered exactly once
    assert set(our_paths) == set(leaves)
    for key in keys:
        hf_shape = expected_shape(key, config)
        entry = table[key]
        ours = jax.eval_shape(entry.to_ours, jax.ShapeDtypeStruct(hf_shape, jnp.bfloat16)).shape
        assert tuple(ours) == tuple(leaves[entry.our_path].get_value().shape), key
    # bf16 bytes of the abstract model == the index's total_size (16,089,489,888): the shapes are the real ones
    total = sum(math.prod(v.get_value().shape) * 2 for v in leaves.values())
    assert total == index["metadata"]["total_size"]


def _header_infos(index, config) -> dict[str, TensorInfo]:
    """Stand-in headers for the released files: spec shapes, no bytes."""
    return {k: TensorInfo(k, f, jnp.dtype(jnp.bfloat16), expected_shape(k, config), 0, 0)
            for k, f in index["weight_map"].items()}


def test_loader_preflight_accepts_the_real_headers(index, config, leaves):
    check_headers("index", hf_key_table(config, "original"), leaves, _header_infos(index, config))


def test_loader_preflight_rejects_a_config_with_one_layer_less(index, config, leaves):
    """check_headers works on headers alone; with 27 instead of 28 LLM layers it must list the 12 unknown keys."""
    smaller = dataclasses.replace(config, text=dataclasses.replace(config.text, num_hidden_layers=27))
    small_leaves = {p: v for p, v in leaves.items() if p[:3] != ("language_model", "layers", "27")}
    with pytest.raises(WeightError, match=r"12 unknown key\(s\): model\.layers\.27\."):
        check_headers("index", hf_key_table(smaller, "original"), small_leaves, _header_infos(index, config))
