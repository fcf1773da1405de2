"""Bad checkpoints fail with one clear error naming the file or tensor; the CLI prints one line and exits 2."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cogstream_jax import load_pretrained
from cogstream_jax.errors import ConfigError, WeightError
from convert.hf_to_orbax import convert
from weights_helpers import torch_model, write_native, write_original

REPO = pathlib.Path(__file__).resolve().parents[1]
LM_HEAD = "lm_head.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    return {"native": write_native(torch_model(), root / "native"),
            "original": write_original(torch_model(), root / "original")}


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_tensors(folder: pathlib.Path, edit) -> None:
    """Rewrite model.safetensors with the safetensors library after `edit(dict of numpy arrays)`."""
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_missing_shard_named_in_the_index(good, tmp_path):
    folder = _copy(good["original"], tmp_path / "ckpt")
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(WeightError, match=r"model-00002-of-00003\.safetensors: shard named in .*index\.json is missing"):
        load_pretrained(folder)


def test_truncated_safetensors_file(good, tmp_path):
    folder = _copy(good["native"], tmp_path / "ckpt")
    path = folder / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(WeightError, match=r"model\.safetensors: truncated: tensor '.+' needs bytes up to \d+"):
        load_pretrained(folder)


def test_unknown_key_is_named(good, tmp_path):
    folder = _copy(good["native"], tmp_path / "ckpt")
    _rewrite_tensors(folder, lambda t: t.update({"model.language_model.layers.7.mlp.up_proj.weight": t[LM_HEAD]}))
    with pytest.raises(WeightError, match=r"1 unknown key\(s\): model\.language_model\.layers\.7\.mlp\.up_proj\.weight"):
        load_pretrained(folder)


def test_missing_key_is_named(good, tmp_path):
    folder = _copy(good["native"], tmp_path / "ckpt")
    _rewrite_tensors(folder, lambda t: t.pop("model.projector.readout.2.bias"))
    with pytest.raises(WeightError, match=r"1 missing key\(s\): model\.projector\.readout\.2\.bias"):
        load_pretrained(folder)


def test_wrong_shape_names_tensor_and_shapes(good, tmp_path):
    folder = _copy(good["native"], tmp_path / "ckpt")
    _rewrite_tensors(folder, lambda t: t.update({LM_HEAD: np.zeros((150, 64), np.float32)}))
    with pytest.raises(WeightError, match=r"lm_head\.weight in model\.safetensors: checkpoint \(150, 64\) -> \(64, 150\), "
                                          r"model expects \(64, 160\)"):
        load_pretrained(folder)


def test_unsupported_model_type_names_config_file(good, tmp_path):
    folder = _copy(good["native"], tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llava_qwen2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config\.json: unsupported model_type 'llava_qwen2'"):
        load_pretrained(folder)


def test_corrupt_header_and_unknown_dtype_request(good, tmp_path):
    folder = _copy(good["native"], tmp_path / "ckpt")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(WeightError, match=r"model\.safetensors: corrupt safetensors header"):
        load_pretrained(folder)
    with pytest.raises(ConfigError, match=r"dtype='float16': expected one of"):
        load_pretrained(good["native"], dtype="float16")


def test_orbax_folder_with_edited_config_is_refused(good, tmp_path):
    convert(str(good["native"]), str(tmp_path / "orbax"), "float32")
    config = json.loads((tmp_path / "orbax" / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    (tmp_path / "orbax" / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightError, match=r"orbax/config\.json: does not match the config the parameters were saved"):
        load_pretrained(tmp_path / "orbax")


def test_cli_reports_a_user_error_on_one_line(good, tmp_path):
    folder = _copy(good["original"], tmp_path / "ckpt")
    (folder / "model-00003-of-00003.safetensors").unlink()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-m", "convert.hf_to_orbax", "--model_path", str(folder),
                             "--output-dir", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: ") and "model-00003-of-00003.safetensors" in lines[0]
    assert not (tmp_path / "out").exists()


def test_orbax_params_that_do_not_fit_the_config_are_listed(good, tmp_path):
    """A consistent meta/config pair for 1 LLM layer over params saved with 2: the extra layer's keys are named."""
    from cogstream_jax.config import ModelConfig

    folder = tmp_path / "orbax"
    convert(str(good["native"]), str(folder), "float32")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    meta = json.loads((folder / "cogstream_meta.json").read_text())
    meta["config_fingerprint"] = ModelConfig.from_hf_config(config).fingerprint()
    (folder / "cogstream_meta.json").write_text(json.dumps(meta))
    with pytest.raises(WeightError, match=r"orbax/params: checkpoint does not match the model config: 12 unknown "
                                          r"key\(s\): language_model\.layers\.1\."):
        load_pretrained(folder)
