"""PEFT -> JAX: an adapter made by real peft with CogStream's official LoraConfig (module paths translated to the
native layout of the transformers model, random B) imports through `convert.peft_to_lora` or `load_peft_adapter`
and reproduces peft's logits (<= 1e-4); PEFT -> ours -> PEFT returns the same tensors; bad adapters fail clearly."""
from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from cogstream_jax import adapter_io, lora
from cogstream_jax.peft_io import load_peft_adapter
from convert import lora_to_peft, peft_to_lora
from peft_helpers import fresh_ours, fresh_torch, official_targets, run_cli, to_native_by_hand
from weights_helpers import our_logits, reference_logits, to_original_key, write_native

LAYERS = 2
ROOT = pathlib.Path(__file__).resolve().parents[1]


def official_config(projector: bool) -> peft.LoraConfig:
    """The official training scripts' LoraConfig, module paths renamed for the transformers model."""
    return peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, bias="none", task_type="CAUSAL_LM",
                           target_modules=[to_native_by_hand(t) for t in official_targets(LAYERS, projector)])


def randomize_peft(model, seed: int) -> None:
    """Random A and B in every LoRA layer (peft initialises B to zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=g))


@pytest.fixture(scope="module")
def peft_saved(tmp_path_factory):
    """(peft model, its logits, single-adapter folder, multi-adapter folder) for a random `full_module`."""
    root = tmp_path_factory.mktemp("peft_made")
    model = peft.get_peft_model(fresh_torch(), official_config(projector=True), adapter_name=lora.FULL_MODULE)
    randomize_peft(model, seed=1)
    model.add_adapter(lora.LANGUAGE_MODULE, official_config(projector=False))
    randomize_peft_adapter(model, lora.LANGUAGE_MODULE, seed=2)
    model.eval()
    model.save_pretrained(str(root / "multi"))  # peft's layout: one sub-folder per (non-default) adapter
    model.set_adapter(lora.FULL_MODULE)
    logits = reference_logits(model)
    single = root / "single"
    shutil.copytree(root / "multi" / lora.FULL_MODULE, single)
    return model, logits, single, root / "multi"


def randomize_peft_adapter(model, adapter: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{adapter}." in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=g))


def test_peft_adapter_imports_and_reproduces_peft_logits(peft_saved, tmp_path, capsys):
    peft_model, expected, single, _ = peft_saved
    code, err = run_cli(peft_to_lora.main, ["--adapter_dir", single, "--adapter_name", lora.FULL_MODULE,
                                            "--output_dir", tmp_path / "ours", "--model_path",
                                            write_native(fresh_torch(), tmp_path / "base")], capsys)
    assert code == 0, err
    model = fresh_ours()
    assert adapter_io.load_adapter(model, tmp_path / "ours") == lora.FULL_MODULE
    tensors = lora.adapter_tensors(model, lora.FULL_MODULE)
    assert len(tensors) == 16 and all(np.count_nonzero(t) == t.size for pair in tensors.values() for t in pair)
    lora.set_adapter(model, lora.FULL_MODULE)
    got = our_logits(model)
    assert np.abs(got - expected).max() <= 1e-4
    with peft_model.disable_adapter():
        assert np.abs(got - reference_logits(peft_model)).max() > 0.1


def test_load_peft_adapter_reads_the_multi_adapter_layout_directly(peft_saved):
    peft_model, expected, _, multi = peft_saved
    model = fresh_ours()
    load_peft_adapter(model, multi, lora.FULL_MODULE)
    load_peft_adapter(model, multi, lora.LANGUAGE_MODULE)
    assert lora.adapter_spec(model, lora.FULL_MODULE).scale == 2.0
    lora.set_adapter(model, lora.FULL_MODULE)
    assert np.abs(our_logits(model) - expected).max() <= 1e-4
    lora.set_adapter(model, lora.LANGUAGE_MODULE)
    peft_model.set_adapter(lora.LANGUAGE_MODULE)
    try:
        assert np.abs(our_logits(model) - reference_logits(peft_model)).max() <= 1e-4
    finally:
        peft_model.set_adapter(lora.FULL_MODULE)


def test_peft_to_ours_to_peft_returns_the_same_tensors(peft_saved, tmp_path):
    _, _, single, _ = peft_saved
    base = write_native(fresh_torch(), tmp_path / "base")
    assert peft_to_lora.main(["--adapter-dir", str(single), "--adapter-name", lora.FULL_MODULE, "--output-dir",
                              str(tmp_path / "ours"), "--model-path", str(base)]) == 0
    assert lora_to_peft.main(["--adapter_dir", str(tmp_path / "ours"), "--output_dir", str(tmp_path / "back"),
                              "--layout", "native"]) == 0
    before, after = load_file(str(single / "adapter_model.safetensors")), load_file(
        str(tmp_path / "back" / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    old, new = (json.loads((d / "adapter_config.json").read_text()) for d in (single, tmp_path / "back"))
    for field in ("r", "lora_alpha", "lora_dropout", "bias", "peft_type", "task_type"):
        assert old[field] == new[field], field
    assert sorted(old["target_modules"]) == sorted(new["target_modules"])


# ---------------------------------------------------------------------------------------------- bad input
def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _rename_tensor_modules(folder, old: str, new: str):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({k.replace(old, new): v for k, v in tensors.items()}, str(path))


@pytest.fixture
def broken(peft_saved, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(peft_saved[2], folder)
    return folder


def _expect_error(broken, tmp_path, capsys, fragment, model_path=True):
    argv = ["--adapter_dir", broken, "--adapter_name", lora.FULL_MODULE, "--output_dir", tmp_path / "out"]
    if model_path:
        argv += ["--model_path", write_native(fresh_torch(), tmp_path / "base")]
    code, err = run_cli(peft_to_lora.main, argv, capsys)
    assert code == 2, err
    assert fragment in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_targets_that_do_not_exist(broken, tmp_path, capsys):
    _edit_config(broken, target_modules=json.loads((broken / "adapter_config.json").read_text())["target_modules"]
                 + ["model.language_model.layers.7.self_attn.q_proj"])
    _expect_error(broken, tmp_path, capsys, "do not exist in the base model")


def test_weights_for_modules_that_do_not_exist(broken, tmp_path, capsys):
    _rename_tensor_modules(broken, "layers.1.mlp.up_proj", "layers.5.mlp.up_proj")
    _edit_config(broken, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                         "down_proj", "readout.0", "readout.2"])
    _expect_error(broken, tmp_path, capsys, "targets module(s) that do not exist in the base model")


def test_weights_the_config_does_not_target(broken, tmp_path, capsys):
    """PEFT would silently drop these weights; we refuse."""
    _edit_config(broken, target_modules=[t for t in json.loads((broken / "adapter_config.json").read_text())[
        "target_modules"] if "projector" not in t])
    _expect_error(broken, tmp_path, capsys, "does not cover module(s) that have weights")


def test_rank_mismatch_between_tensors_and_config(broken, tmp_path, capsys):
    _edit_config(broken, r=4)
    _expect_error(broken, tmp_path, capsys, "rank mismatch between tensors and adapter_config.json field 'r'=4")


def test_missing_adapter_config(broken, tmp_path, capsys):
    (broken / "adapter_config.json").unlink()
    _expect_error(broken, tmp_path, capsys, "missing adapter_config.json")


def test_wrong_key_prefix(broken, tmp_path, capsys):
    """The classic silent failure in PEFT (B stays zero) is a clear error here."""
    _rename_tensor_modules(broken, "base_model.model.", "")
    _expect_error(broken, tmp_path, capsys, "are not LoRA A/B weights")


def test_adapter_for_a_different_base(broken, tmp_path, capsys):
    """The tiny adapter checked against the default base (VideoLLaMA3-7B) and against a base with other shapes."""
    _expect_error(broken, tmp_path, capsys, "adapter for a different base", model_path=False)
    other = write_native(fresh_torch(kv_heads=4), tmp_path / "other")
    code, err = run_cli(peft_to_lora.main, ["--adapter_dir", broken, "--adapter_name", lora.FULL_MODULE,
                                            "--output_dir", tmp_path / "out", "--model_path", other], capsys)
    assert code == 2 and "adapter for a different base" in err and "k_proj" in err


def test_fingerprint_travels_through_peft_and_guards_the_base(tmp_path, capsys):
    """An adapter we exported records its base; importing it against another base fails even if shapes agree."""
    model = fresh_ours()
    lora.add_adapter(model, lora.LANGUAGE_MODULE, lora.language_module_spec(model.config))
    adapter_io.save_adapter(model, lora.LANGUAGE_MODULE, tmp_path / "ours")
    assert lora_to_peft.main(["--adapter_dir", str(tmp_path / "ours"), "--output_dir", str(tmp_path / "p"),
                              "--layout", "native"]) == 0
    config = fresh_torch().config.to_dict()
    config["text_config"]["rms_norm_eps"] = 1e-5  # same shapes, different architecture settings
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps(config))
    code, err = run_cli(peft_to_lora.main, ["--adapter_dir", tmp_path / "p", "--adapter_name", "language_module",
                                            "--output_dir", tmp_path / "o", "--model_path", tmp_path / "other"],
                        capsys)
    assert code == 2 and "different base (base_fingerprint" in err


def test_unsupported_peft_features_are_named(broken, tmp_path, capsys):
    _edit_config(broken, use_dora=True)
    _expect_error(broken, tmp_path, capsys, "field 'use_dora'=True is not supported")


def test_original_layout_adapter_as_cogstream_ships_it(peft_saved, tmp_path):
    """CogStream's adapters name modules like `model.layers.0.self_attn.q_proj`: the same adapter renamed by hand
    to the original layout (keys and target_modules) imports to the same model."""
    _, expected, single, _ = peft_saved
    folder = tmp_path / "original"
    folder.mkdir()
    tensors = load_file(str(single / "adapter_model.safetensors"))
    prefix = "base_model.model."
    save_file({prefix + to_original_key(k[len(prefix):]): v for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"))
    config = json.loads((single / "adapter_config.json").read_text())
    config["target_modules"] = official_targets(LAYERS, projector=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    model = fresh_ours()
    load_peft_adapter(model, folder, lora.FULL_MODULE)
    lora.set_adapter(model, lora.FULL_MODULE)
    assert np.abs(our_logits(model) - expected).max() <= 1e-4


def test_cli_runs_as_a_module_and_fails_in_one_line(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "convert.peft_to_lora", "--adapter-dir", str(tmp_path),
                           "--adapter-name", "full_module", "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {tmp_path / 'adapter_config.json'}: missing "
                                                "adapter_config.json"]


def test_rslora_scale_is_carried_over(tmp_path):
    """use_rslora scales by alpha/sqrt(r); the import folds that into alpha so our alpha/r gives the same scale."""
    config = official_config(projector=True)
    config.use_rslora = True
    model = peft.get_peft_model(fresh_torch(), config)
    randomize_peft(model, seed=3)
    model.eval().save_pretrained(str(tmp_path / "rs"))
    ours = fresh_ours()
    load_peft_adapter(ours, tmp_path / "rs", lora.FULL_MODULE)
    assert lora.adapter_spec(ours, lora.FULL_MODULE).scale == pytest.approx(16 / np.sqrt(8))
    lora.set_adapter(ours, lora.FULL_MODULE)
    assert np.abs(our_logits(ours) - reference_logits(model)).max() <= 1e-4


def test_bfloat16_peft_adapter_imports_exactly(peft_saved, tmp_path):
    """Adapters saved in bf16 (common after bf16 training) keep their values through our directory format."""
    _, _, single, _ = peft_saved
    folder = tmp_path / "bf16"
    shutil.copytree(single, folder)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    assert peft_to_lora.main(["--adapter_dir", str(folder), "--adapter_name", "full_module", "--output_dir",
                              str(tmp_path / "ours"), "--model_path",
                              str(write_native(fresh_torch(), tmp_path / "base"))]) == 0
    model = fresh_ours()
    adapter_io.load_adapter(model, tmp_path / "ours")
    a, b = lora.adapter_tensors(model, lora.FULL_MODULE)["model.layers.1.mlp.gate_proj"]
    key = "base_model.model.model.language_model.layers.1.mlp.gate_proj.lora_{}.weight"
    np.testing.assert_array_equal(a, tensors[key.format("A")].float().numpy().T)
    np.testing.assert_array_equal(b, tensors[key.format("B")].float().numpy().T)
