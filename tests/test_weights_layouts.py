"""Import of real safetensors checkpoints: both key layouts, single file and index-sharded, fp32 and bf16."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cogstream_jax import load_pretrained
from weights_helpers import (assert_same_params, our_logits, params_of, reference_logits, torch_model,
                             write_native, write_original)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tm = torch_model()
    root = tmp_path_factory.mktemp("layouts")
    return {"native": write_native(tm, root / "native"), "original": write_original(tm, root / "original")}


@pytest.fixture(scope="module")
def native_model(folders):
    return load_pretrained(folders["native"])


def test_both_layouts_load_to_identical_parameters(folders, native_model):
    """Native single file and original 3-shard + index hold the same tensors: the models must be bit-equal."""
    assert_same_params(native_model, load_pretrained(folders["original"]))


def test_tensors_land_transposed_where_the_spec_says(native_model):
    """Spec 7.3 spot checks against the torch weights: Linear W.T, patch conv flattened (C, y, x) then .T."""
    state = torch_model().state_dict()
    params = params_of(native_model)
    np.testing.assert_array_equal(params[("lm_head", "kernel")], state["lm_head.weight"].numpy().T)
    np.testing.assert_array_equal(params[("language_model", "layers", "1", "self_attn", "k_proj", "bias")],
                                  state["model.language_model.layers.1.self_attn.k_proj.bias"].numpy())
    patch = state["model.vision_model.embeddings.patch_embedding.weight"].numpy()
    assert patch.shape == (32, 3, 14, 14)
    np.testing.assert_array_equal(params[("vision_encoder", "embeddings", "patch_embedding", "kernel")],
                                  patch.reshape(32, 588).T)
    np.testing.assert_array_equal(params[("vision_encoder", "post_layernorm", "scale")],
                                  state["model.vision_model.post_layernorm.weight"].numpy())
    np.testing.assert_array_equal(params[("language_model", "embed_tokens", "embedding")],
                                  state["model.language_model.embed_tokens.weight"].numpy())


def test_loaded_model_computes_what_transformers_computes(native_model):
    """End to end through load_pretrained: an image and a video in one request, max |Δ logits| <= 1e-4."""
    ours, ref = our_logits(native_model), reference_logits(torch_model())
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4


def test_bf16_checkpoint_is_cast_per_tensor(tmp_path):
    """A bf16 checkpoint (what VideoLLaMA3-7B ships) loads exactly into bf16, and exactly upcast into fp32."""
    folder = write_original(torch_model(), tmp_path / "bf16", n_shards=2, dtype=torch.bfloat16)
    as_bf16, as_f32 = load_pretrained(folder, dtype="bfloat16"), load_pretrained(folder, dtype="float32")
    expected = torch_model().state_dict()["lm_head.weight"].to(torch.bfloat16).float().numpy().T
    p16, p32 = params_of(as_bf16), params_of(as_f32)
    assert {str(v.dtype) for v in p16.values()} == {"bfloat16"}
    assert {str(v.dtype) for v in p32.values()} == {"float32"}
    np.testing.assert_array_equal(p16[("lm_head", "kernel")].astype(np.float32), expected)
    np.testing.assert_array_equal(p32[("lm_head", "kernel")], expected)
    for path in p16:
        np.testing.assert_array_equal(p16[path].astype(np.float32), p32[path], err_msg=str(path))


def test_checkpoint_written_by_transformers_save_pretrained_loads(native_model, tmp_path):
    """transformers' own sharded writer (its index json, its shard names, its config.json) is read as is."""
    torch_model().save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert_same_params(native_model, load_pretrained(tmp_path))
