"""Merged export: base safetensors + adapter -> W + (alpha/r) B A in fp32, sharded with an index; reloads in
transformers and in `load_pretrained` and matches the unmerged LoRA model; equals peft's own merge_and_unload."""
from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import VideoLlama3ForConditionalGeneration

from cogstream_jax import adapter_io, load_pretrained, lora
from cogstream_jax.merged_export import export_merged_from_dir
from cogstream_jax.peft_io import save_peft_adapter
from convert import export_merged, hf_to_orbax
from peft_helpers import fresh_torch, randomize, run_cli
from weights_helpers import assert_same_params, our_logits, reference_logits, to_original_key, write_native, write_original


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {"native": write_native(fresh_torch(), root / "native"),
            "original": write_original(fresh_torch(), root / "original")}


@pytest.fixture(scope="module")
def adapted(bases, tmp_path_factory):
    """(our model with a random full_module active, its logits, our adapter dir, a PEFT folder of it)."""
    model = load_pretrained(bases["native"])  # the native config keeps the separate video token id
    lora.add_adapter(model, lora.FULL_MODULE, lora.full_module_spec(model.config))
    randomize(model, lora.FULL_MODULE, seed=4)
    root = tmp_path_factory.mktemp("adapters")
    ours = adapter_io.save_adapter(model, lora.FULL_MODULE, root / "ours")
    peft_dir = save_peft_adapter(model, lora.FULL_MODULE, root / "peft", layout="native")
    lora.set_adapter(model, lora.FULL_MODULE)
    return model, our_logits(model), ours, peft_dir


@pytest.fixture(scope="module")
def adapter_on_original(bases, adapted, tmp_path_factory):
    """The same adapter saved from the model loaded from the original-layout base (whose config, having one
    placeholder id, has another fingerprint)."""
    model = load_pretrained(bases["original"])
    lora.add_adapter(model, lora.FULL_MODULE, lora.full_module_spec(model.config))
    lora.set_adapter_tensors(model, lora.FULL_MODULE, lora.adapter_tensors(adapted[0], lora.FULL_MODULE))
    return adapter_io.save_adapter(model, lora.FULL_MODULE, tmp_path_factory.mktemp("on_original") / "ours")


@pytest.fixture(scope="module")
def merged_native(bases, adapted, tmp_path_factory):
    """The CLI's native export of the native base + our adapter directory, in several shards."""
    out = tmp_path_factory.mktemp("merged") / "native"
    assert export_merged.main(["--model_path", str(bases["native"]), "--adapter_dir", str(adapted[2]),
                               "--output_dir", str(out), "--layout", "native", "--max_shard_size", "200KB"]) == 0
    return out


def test_native_merged_export_reloads_in_transformers(adapted, merged_native):
    lora_logits = adapted[1]
    index = json.loads((merged_native / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # written shard by shard
    reloaded, info = VideoLlama3ForConditionalGeneration.from_pretrained(merged_native, dtype=torch.float32,
                                                                         output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    merged_logits = reference_logits(reloaded.eval())
    assert np.abs(merged_logits - lora_logits).max() <= 1e-4
    assert np.abs(merged_logits - reference_logits(fresh_torch())).max() > 0.1


def test_merged_export_loads_in_load_pretrained(adapted, merged_native):
    assert np.abs(our_logits(load_pretrained(merged_native)) - adapted[1]).max() <= 1e-4


@pytest.mark.parametrize("layout", ["original", "native"])
def test_original_base_and_peft_input_give_the_same_weights(bases, adapted, adapter_on_original, merged_native,
                                                            layout, tmp_path):
    """From the 3-shard original-layout base (CogStream's keys) or from a PEFT folder, in either output layout:
    the same parameters as the export checked against transformers above."""
    from_original = export_merged_from_dir(bases["original"], adapter_on_original, tmp_path / "a", layout=layout)
    export_merged_from_dir(bases["native"], adapted[3], tmp_path / "b", layout=layout)
    assert from_original == ["model.safetensors"]
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["model_type"] == {"original": "videollama3_qwen2", "native": "video_llama_3"}[layout]
    reference = load_pretrained(merged_native)
    assert_same_params(load_pretrained(tmp_path / "a"), reference)
    assert_same_params(load_pretrained(tmp_path / "b"), reference)


def test_merged_weights_equal_peft_merge_and_unload(bases, adapted, tmp_path):
    """Our streaming merge agrees with peft's merge; tensors without an adapter are copied bit for bit."""
    _, _, ours, peft_dir = adapted
    export_merged_from_dir(bases["native"], ours, tmp_path / "merged", layout="original")
    mine = load_file(str(tmp_path / "merged" / "model.safetensors"))
    theirs = peft.PeftModel.from_pretrained(fresh_torch(), str(peft_dir)).merge_and_unload().state_dict()
    base = fresh_torch().state_dict()
    assert len(mine) == len(theirs)
    changed = 0
    for key, value in theirs.items():
        got = mine[to_original_key(key)]
        np.testing.assert_allclose(got.numpy(), value.numpy(), rtol=0, atol=1e-6, err_msg=key)
        if torch.equal(base[key], value):
            assert torch.equal(got, value), key
        else:
            changed += 1
    assert changed == 7 * 2 + 2  # every adapted weight, and nothing else


def test_bfloat16_output(bases, adapted, tmp_path):
    _, lora_logits, ours, _ = adapted
    export_merged_from_dir(bases["native"], ours, tmp_path / "bf16", layout="native", dtype="bfloat16")
    tensors = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {v.dtype for v in tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    logits = our_logits(load_pretrained(tmp_path / "bf16", dtype="float32"))
    assert np.abs(logits - lora_logits).max() < 0.25  # bf16 rounding of the weights only


def test_bad_input_is_one_line(bases, adapted, tmp_path, capsys):
    _, _, ours, _ = adapted
    orbax = tmp_path / "orbax"
    assert hf_to_orbax.main(["--model_path", str(bases["native"]), "--output_dir", str(orbax)]) == 0
    other = write_native(fresh_torch(kv_heads=4), tmp_path / "other")
    (tmp_path / "empty").mkdir()
    cases = [([orbax, ours, tmp_path / "o1"], "is an orbax folder; merged export streams safetensors"),
             ([other, ours, tmp_path / "o2"], "adapter for a different base"),
             ([bases["native"], tmp_path / "empty", tmp_path / "o3"], "missing adapter_config.json"),
             ([bases["native"], ours, bases["native"]], "must differ from --model_path")]
    for (model_path, adapter_dir, out), fragment in cases:
        code, err = run_cli(export_merged.main, ["--model-path", model_path, "--adapter-dir", adapter_dir,
                                                 "--output-dir", out], capsys)
        assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
        assert out == bases["native"] or not out.exists()


def test_interrupted_export_resumes_keeping_completed_shards(bases, adapted, tmp_path, capsys):
    """Re-running keeps finished shards (same file, untouched) and writes only the missing or stale ones."""
    _, lora_logits, ours, _ = adapted
    out = tmp_path / "merged"
    argv = ["--model_path", bases["native"], "--adapter_dir", ours, "--output_dir", out, "--layout", "native",
            "--max_shard_size", "200KB"]
    assert run_cli(export_merged.main, argv, capsys)[0] == 0
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3
    before = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()  # as if the run had died while writing shard 2
    (out / f"{shards[0].name}.tmp999").write_bytes(b"partial")
    code, err = run_cli(export_merged.main, argv, capsys)
    assert code == 0 and f"kept {len(shards) - 1} shard(s)" in err
    assert {p.name: p.stat().st_mtime_ns for p in shards if p != shards[1]} == {
        k: v for k, v in before.items() if k != shards[1].name}
    assert shards[1].exists() and not (out / f"{shards[0].name}.tmp999").exists()
    assert np.abs(our_logits(load_pretrained(out)) - lora_logits).max() <= 1e-4
    # another adapter: nothing may be kept
    other = tmp_path / "other_adapter"
    model = load_pretrained(bases["native"])
    lora.add_adapter(model, lora.FULL_MODULE, lora.full_module_spec(model.config))
    randomize(model, lora.FULL_MODULE, seed=99)
    adapter_io.save_adapter(model, lora.FULL_MODULE, other)
    argv[3] = other
    code, err = run_cli(export_merged.main, argv, capsys)
    assert code == 0 and "kept" not in err
    lora.set_adapter(model, lora.FULL_MODULE)
    assert np.abs(our_logits(load_pretrained(out)) - our_logits(model)).max() <= 1e-4


def test_original_export_keeps_the_base_config_extras(bases, adapter_on_original, tmp_path):
    """auto_map (for the copied modeling .py files) and other keys we do not model survive an original-layout
    export of an original-layout base; a layout change writes only the target layout's keys."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(bases["original"], base)
    config = json.loads((base / "config.json").read_text())
    config.update(auto_map={"AutoModelForCausalLM": "modeling_videollama3.Videollama3Qwen2ForCausalLM"},
                  initializer_range=0.02)
    (base / "config.json").write_text(json.dumps(config))
    (base / "modeling_videollama3.py").write_text("# the remote code\n")
    export_merged_from_dir(base, adapter_on_original, tmp_path / "same", layout="original")
    export_merged_from_dir(base, adapter_on_original, tmp_path / "native", layout="native")
    same = json.loads((tmp_path / "same" / "config.json").read_text())
    assert same["auto_map"] == config["auto_map"] and same["initializer_range"] == 0.02
    assert same["model_type"] == "videollama3_qwen2" and (tmp_path / "same" / "modeling_videollama3.py").is_file()
    assert "auto_map" not in json.loads((tmp_path / "native" / "config.json").read_text())
