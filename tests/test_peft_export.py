"""JAX -> PEFT: our adapters, converted by `convert.lora_to_peft`, load with real peft 0.21 onto transformers'
VideoLlama3ForConditionalGeneration and give our logits (<= 1e-4), far from the base model's; no LoRA weight is
left at zero; the stage-2 adapter changes the projector; the files follow the official naming."""
from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch
from safetensors.torch import load_file

from cogstream_jax import adapter_io, lora
from cogstream_jax.peft_io import save_peft_adapter
from convert import lora_to_peft
from peft_helpers import fresh_ours, fresh_torch, official_targets, run_cli, to_native_by_hand, with_random_adapters
from weights_helpers import our_logits, reference_logits
from xla_env import xla_flags

ADAPTERS = (lora.LANGUAGE_MODULE, lora.FULL_MODULE)


@pytest.fixture(scope="module")
def ours():
    """Our tiny model (same base weights as `fresh_torch()`) with both adapters, random A and B."""
    return with_random_adapters(fresh_ours())


@pytest.fixture(scope="module")
def our_dirs(ours, tmp_path_factory):
    root = tmp_path_factory.mktemp("ours")
    return {name: adapter_io.save_adapter(ours, name, root / name) for name in ADAPTERS}


@pytest.fixture(scope="module")
def peft_dirs(our_dirs, tmp_path_factory):
    """Both adapters through the CLI, native layout (module names of the transformers model)."""
    root = tmp_path_factory.mktemp("peft")
    for name, src in our_dirs.items():
        assert lora_to_peft.main(["--adapter_dir", str(src), "--output_dir", str(root / name),
                                  "--layout", "native"]) == 0
    return {name: root / name for name in ADAPTERS}


@pytest.fixture(scope="module")
def peft_model(peft_dirs):
    base = fresh_torch()
    model = peft.PeftModel.from_pretrained(base, str(peft_dirs[lora.LANGUAGE_MODULE]),
                                           adapter_name=lora.LANGUAGE_MODULE)
    model.load_adapter(str(peft_dirs[lora.FULL_MODULE]), adapter_name=lora.FULL_MODULE)
    return model.eval()


def our_logits_with(model, name):
    lora.set_adapter(model, name)
    try:
        return our_logits(model)
    finally:
        lora.set_adapter(model, None)


@pytest.mark.parametrize("name", ADAPTERS)
def test_peft_logits_equal_ours_and_differ_from_base(peft_model, ours, name):
    peft_model.set_adapter(name)
    theirs = reference_logits(peft_model)
    with peft_model.disable_adapter():
        base = reference_logits(peft_model)
    assert np.abs(theirs - our_logits_with(ours, name)).max() <= 1e-4
    assert np.abs(theirs - base).max() > 0.1  # the adapter really acts
    assert np.abs(base - our_logits_with(ours, None)).max() <= 1e-4


def test_every_lora_weight_arrives_non_zero_and_exact(peft_model, ours):
    """The silent failure (wrong prefix -> B left at zero) cannot happen: every A and B equals ours, transposed."""
    native = {to_native_by_hand(hf): hf for hf in official_targets(2, projector=True)}
    seen = 0
    for param_name, param in peft_model.named_parameters():
        if ".lora_A." not in param_name and ".lora_B." not in param_name:
            continue
        adapter = lora.LANGUAGE_MODULE if f".{lora.LANGUAGE_MODULE}." in param_name else lora.FULL_MODULE
        module = param_name.removeprefix("base_model.model.").split(".lora_")[0]
        a, b = lora.adapter_tensors(ours, adapter)[native[module]]
        expected = a.T if ".lora_A." in param_name else b.T
        assert torch.count_nonzero(param).item() == param.numel(), param_name
        np.testing.assert_array_equal(param.detach().numpy(), expected, err_msg=param_name)
        seen += 1
    assert seen == 2 * (14 + 16)  # A and B of 14 language modules + 16 full-module modules


def test_stage2_adapter_changes_projector_outputs(peft_model, ours):
    feats = torch.randn(6, 32, generator=torch.Generator().manual_seed(5))
    projector = peft_model.base_model.model.model.projector
    with torch.no_grad():
        with peft_model.disable_adapter():
            base = projector(feats).numpy()
        peft_model.set_adapter(lora.LANGUAGE_MODULE)
        language = projector(feats).numpy()
        peft_model.set_adapter(lora.FULL_MODULE)
        full = projector(feats).numpy()
    np.testing.assert_array_equal(language, base)  # stage 1 leaves the projector alone
    assert np.abs(full - base).max() > 0.05
    lora.set_adapter(ours, lora.FULL_MODULE)
    try:
        assert np.abs(np.asarray(ours.mm_projector(feats.numpy())) - full).max() <= 1e-5
    finally:
        lora.set_adapter(ours, None)


def test_native_files_use_full_module_paths(peft_dirs):
    folder = peft_dirs[lora.FULL_MODULE]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.1)
    assert sorted(config["target_modules"]) == sorted(to_native_by_hand(t) for t in official_targets(2, True))
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.language_model.layers.1.mlp.down_proj.lora_A.weight"].shape == (8, 128)
    assert tensors["base_model.model.model.projector.readout.0.lora_B.weight"].shape == (64, 8)
    assert len(tensors) == 2 * 16
    assert peft.LoraConfig.from_pretrained(str(folder)).target_modules == set(config["target_modules"])


def test_original_layout_matches_the_official_training_script(ours, our_dirs, tmp_path, capsys):
    """`--layout original` (the default) writes CogStream's own module list and keys; the library call agrees."""
    code, err = run_cli(lora_to_peft.main, ["--adapter-dir", our_dirs[lora.FULL_MODULE], "--output-dir",
                                            tmp_path / "cli"], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "cli" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(official_targets(2, projector=True))
    assert config["base_model_name_or_path"] == "DAMO-NLP-SG/VideoLLaMA3-7B"
    cli = load_file(str(tmp_path / "cli" / "adapter_model.safetensors"))
    a, b = lora.adapter_tensors(ours, lora.FULL_MODULE)["model.mm_projector.readout.2"]
    np.testing.assert_array_equal(cli["base_model.model.model.mm_projector.readout.2.lora_A.weight"].numpy(), a.T)
    np.testing.assert_array_equal(cli["base_model.model.model.mm_projector.readout.2.lora_B.weight"].numpy(), b.T)
    save_peft_adapter(ours, lora.FULL_MODULE, tmp_path / "lib")
    lib = load_file(str(tmp_path / "lib" / "adapter_model.safetensors"))
    assert lib.keys() == cli.keys() and all(torch.equal(lib[k], cli[k]) for k in lib)


def test_lora_to_peft_bad_input_is_one_line(our_dirs, tmp_path, capsys):
    code, err = run_cli(lora_to_peft.main, ["--adapter_dir", tmp_path / "nowhere", "--output_dir", tmp_path / "o"],
                        capsys)
    assert code == 2 and "adapter directory does not exist" in err and len(err.strip().splitlines()) == 1
    code, err = run_cli(lora_to_peft.main, ["--adapter_dir", our_dirs[lora.FULL_MODULE], "--output_dir",
                                            our_dirs[lora.FULL_MODULE]], capsys)
    assert code == 2 and "must differ from --adapter_dir" in err
    other = tmp_path / "other_base"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(fresh_torch(kv_heads=4).config.to_dict()))
    code, err = run_cli(lora_to_peft.main, ["--adapter_dir", our_dirs[lora.FULL_MODULE], "--output_dir",
                                            tmp_path / "o", "--model_path", other], capsys)
    assert code == 2 and "different base" in err and len(err.strip().splitlines()) == 1


def test_7b_adapter_names_and_shapes_match_the_official_recipe():
    """On the real VideoLLaMA3-7B config (abstract, no weights): full_module's 198 modules are exactly the official
    script's list in the original layout, and 7B-shaped A/B pass the base check while tiny ones do not."""
    from cogstream_jax.config import videollama3_7b
    from cogstream_jax.lora_tensors import AdapterTensors, check_against_config, module_in_layout
    from cogstream_jax.peft_io import peft_config_json

    config = videollama3_7b()
    spec = lora.full_module_spec(config)
    names = list(lora.resolve_targets(config, spec).values())
    assert sorted(names) == sorted(official_targets(28, projector=True)) and len(names) == 198
    assert module_in_layout("model.layers.27.mlp.down_proj", "native") == "model.language_model.layers.27.mlp.down_proj"
    assert module_in_layout("model.mm_projector.readout.2", "native") == "model.projector.readout.2"
    shapes = {"q_proj": (3584, 3584), "k_proj": (3584, 512), "v_proj": (3584, 512), "o_proj": (3584, 3584),
              "gate_proj": (3584, 18944), "up_proj": (3584, 18944), "down_proj": (18944, 3584),
              "readout.0": (1152, 3584), "readout.2": (3584, 3584)}

    def pair(name):  # spec section 3 / 7.1 shapes, as zero-stride views (no memory)
        leaf = name.split(".", 2)[-1] if "readout" in name else name.rsplit(".", 1)[-1]
        in_f, out_f = shapes[leaf]
        return np.broadcast_to(np.float32(0), (in_f, 8)), np.broadcast_to(np.float32(0), (8, out_f))

    adapter = AdapterTensors(spec, {n: pair(n) for n in names}, config.fingerprint(), "7b")
    check_against_config(adapter, config)
    assert peft_config_json(spec, names, None)["target_modules"] == names
    with pytest.raises(lora.AdapterError, match="adapter for a different base"):
        check_against_config(AdapterTensors(spec, {n: (np.zeros((64, 8)), np.zeros((8, 64))) for n in names},
                                            None, "tiny"), config)


def test_adapter_saved_on_a_mesh_converts_on_a_single_device(ours, tmp_path):
    """Adapters come from multi-device training; the conversion machine may have one CPU device."""
    import os
    import pathlib
    import subprocess
    import sys

    from cogstream_jax.sharding import make_mesh, shard_model

    sharded = fresh_ours()
    shard_model(sharded, make_mesh("data=2,fsdp=2,tensor=2"))
    lora.add_adapter(sharded, lora.FULL_MODULE, lora.full_module_spec(sharded.config))
    lora.set_adapter_tensors(sharded, lora.FULL_MODULE, lora.adapter_tensors(ours, lora.FULL_MODULE))
    adapter_io.save_adapter(sharded, lora.FULL_MODULE, tmp_path / "ours")
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "convert.lora_to_peft", "--adapter_dir", str(tmp_path / "ours"),
                           "--output_dir", str(tmp_path / "peft")], capture_output=True, text=True, env=env,
                          cwd=str(pathlib.Path(__file__).resolve().parents[1]), timeout=300)
    assert done.returncode == 0, done.stderr
    a, _ = lora.adapter_tensors(ours, lora.FULL_MODULE)["model.layers.0.self_attn.q_proj"]
    got = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    np.testing.assert_array_equal(got["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].numpy(), a.T)
