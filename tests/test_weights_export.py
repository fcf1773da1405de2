"""Export: native safetensors reload in transformers; original layout and orbax folders round-trip exactly."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import VideoLlama3ForConditionalGeneration

from cogstream_jax import load_pretrained
from cogstream_jax.weights.export import save_pretrained
from cogstream_jax.weights.orbax_io import META_NAME
from convert import hf_to_orbax, orbax_to_hf
from weights_helpers import assert_same_params, our_logits, params_of, reference_logits, torch_model, write_native


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_native(torch_model(), tmp_path_factory.mktemp("export") / "native")


@pytest.fixture(scope="module")
def model(source):
    return load_pretrained(source)


def test_native_export_reloads_in_transformers_with_the_same_logits(model, tmp_path):
    """Sharded native export -> transformers from_pretrained: every key used, logits equal ours (<= 1e-4)."""
    files = save_pretrained(model, tmp_path, layout="native", max_shard_bytes=200_000)
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    reloaded, info = VideoLlama3ForConditionalGeneration.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reference = reference_logits(reloaded.eval())
    assert np.abs(our_logits(model) - reference).max() <= 1e-4
    assert np.abs(reference - reference_logits(torch_model())).max() == 0.0  # the weights went through bit-exact


def test_original_export_round_trips_exactly(model, tmp_path):
    """Original layout export (the released checkpoint's keys and config) -> load_pretrained -> identical."""
    save_pretrained(model, tmp_path, layout="original", max_shard_bytes=150_000)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "videollama3_qwen2"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert "model.vision_encoder.encoder.layers.0.self_attn.q_proj.weight" in index["weight_map"]
    assert "model.mm_projector.readout.2.bias" in index["weight_map"]
    assert "model.layers.1.mlp.down_proj.weight" in index["weight_map"]
    assert_same_params(model, load_pretrained(tmp_path))


def test_export_casts_to_bf16_and_resaving_cleans_stale_shards(model, tmp_path):
    save_pretrained(model, tmp_path, layout="original", max_shard_bytes=150_000)
    (tmp_path / "model-00002-of-00009.safetensors.tmp4242").write_bytes(b"half")  # an interrupted save's temp
    save_pretrained(model, tmp_path, layout="original", dtype="bfloat16")  # one file now: old shards must go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.norm.weight").shape == (64,)
    reloaded = params_of(load_pretrained(tmp_path, dtype="bfloat16"))
    expected = params_of(model)[("lm_head", "kernel")].astype(reloaded[("lm_head", "kernel")].dtype)
    np.testing.assert_array_equal(reloaded[("lm_head", "kernel")], expected)


def test_interrupted_resave_leaves_a_folder_that_does_not_load(model, tmp_path, monkeypatch):
    """A second export into the same folder dies half-way: no index/config of the first one may remain to make
    old and new shards load together."""
    from cogstream_jax.errors import UserError
    from cogstream_jax.weights import export

    save_pretrained(model, tmp_path, layout="original", max_shard_bytes=150_000)
    real, calls = export.export_hf_tensors, {"n": 0}

    def dying(*args, **kwargs):
        for item in real(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > 5:
                raise OSError("disk full")
            yield item

    monkeypatch.setattr(export, "export_hf_tensors", dying)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tmp_path, layout="original", dtype="bfloat16", max_shard_bytes=150_000)
    names = {p.name for p in tmp_path.iterdir()}
    assert "config.json" not in names and "model.safetensors.index.json" not in names
    assert not any(".tmp" in n for n in names)
    with pytest.raises(UserError):
        load_pretrained(tmp_path)


def test_orbax_round_trip_through_both_clis(source, model, tmp_path):
    """hf_to_orbax (fp32) -> load_pretrained(orbax) is identical; orbax_to_hf -> native safetensors identical too."""
    assert hf_to_orbax.main(["--model_path", str(source), "--output-dir", str(tmp_path / "orbax"),
                             "--dtype", "float32"]) == 0
    meta = json.loads((tmp_path / "orbax" / META_NAME).read_text())
    assert meta["config_fingerprint"] == model.config.fingerprint() and meta["num_tensors"] == len(params_of(model))
    restored = load_pretrained(tmp_path / "orbax")
    assert_same_params(model, restored)
    assert restored.config == model.config
    assert orbax_to_hf.main(["--model-path", str(tmp_path / "orbax"), "--output_dir", str(tmp_path / "hf"),
                             "--layout", "native"]) == 0
    assert_same_params(model, load_pretrained(tmp_path / "hf"))


def test_orbax_bf16_folder_restores_into_either_dtype(source, model, tmp_path):
    hf_to_orbax.convert(str(source), str(tmp_path / "orbax16"), "bfloat16")
    as16, as32 = params_of(load_pretrained(tmp_path / "orbax16", dtype="bfloat16")), params_of(
        load_pretrained(tmp_path / "orbax16", dtype="float32"))
    for path, value in params_of(model).items():
        assert as16[path].dtype.name == "bfloat16" and as32[path].dtype == np.float32
        np.testing.assert_array_equal(as16[path], value.astype(as16[path].dtype), err_msg=str(path))
        np.testing.assert_array_equal(as32[path], as16[path].astype(np.float32), err_msg=str(path))
