"""Stage-1 CLI end to end with a tiny random model on the bundled sample: exact resume across a process exit,
restore onto another mesh, SIGTERM -> checkpoint -> resume, and clear one-line errors for bad input."""
from __future__ import annotations

import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from multihost_helpers import _env

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = REPO / "cogstream_jax" / "assets" / "sample"
FAST = ["--model_path", "tiny", "--QA_path", str(SAMPLE), "--global_batch_size", "2", "--max_length", "576",
        "--dtype", "float32", "--num_train_epochs", "1", "--no_progress", "--seed", "0"]


def stage1(out: pathlib.Path, *extra: str, devices: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "train.stage1", *FAST, "--output_dir", str(out), *extra]
    return subprocess.run(cmd, env=_env(devices), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def losses(out: pathlib.Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter_arrays(out: pathlib.Path) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore((out / "adapter" / "lora").absolute())
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    straight, split = root / "straight", root / "split"
    a = stage1(straight, "--max_steps", "6")
    assert a.returncode == 0, a.stderr[-3000:]
    b1 = stage1(split, "--max_steps", "3")
    assert b1.returncode == 0, b1.stderr[-3000:]
    b2 = stage1(split, "--max_steps", "6", "--resume")
    assert b2.returncode == 0, b2.stderr[-3000:]
    return straight, split


@pytest.mark.slow
def test_resume_after_exit_reproduces_the_straight_run(runs):
    straight, split = runs
    la, lb = losses(straight), losses(split)
    assert len(la) == len(lb) == 6
    assert np.allclose(la, lb, atol=1e-6, rtol=0)
    a, b = adapter_arrays(straight), adapter_arrays(split)
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2
    for key in a:
        assert np.abs(a[key] - b[key]).max() <= 1e-6, key
    config = json.loads((straight / "train_config.json").read_text())
    assert config["accumulation_steps"] == 2 and config["total_steps"] == 58 and config["warmup_steps"] == 5


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh(runs):
    from flax import nnx

    from cogstream_jax import config as configs, lora
    from cogstream_jax.model.videollama3 import VideoLlama3
    from cogstream_jax.sharding import make_mesh
    from cogstream_jax.training.checkpoint import TrainCheckpointer
    from cogstream_jax.training.optim import stage1_optim
    from cogstream_jax.training.setup import build_setup

    _, split = runs
    model = VideoLlama3(configs.tiny(), rngs=nnx.Rngs(0))
    mesh = make_mesh("2,2,2")
    spec = lora.language_module_spec(model.config)
    setup = build_setup(model, lora.LANGUAGE_MODULE, spec, stage1_optim(58), mesh, seed=0)
    ckpt = TrainCheckpointer(split / "checkpoints")
    assert ckpt.latest_step() == 6
    state = ckpt.restore(setup.state, setup.state_sharding)
    ckpt.close()
    assert int(state.step) == 6
    q_b = state.params["language_model"]["layers"][0]["self_attn"]["q_proj"]["adapters"][lora.LANGUAGE_MODULE]["lora_b"]
    assert q_b[...].sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
    saved = adapter_arrays(split)
    key = "['model']['layers']['0']['self_attn']['q_proj']['lora_b']"
    assert np.array_equal(np.asarray(q_b[...]), saved[key])


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    out = tmp_path / "term"
    cmd = [sys.executable, "-m", "train.stage1", *FAST, "--output_dir", str(out), "--max_steps", "50"]
    proc = subprocess.Popen(cmd, env=_env(1), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 500
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-2000:]
    done = len(losses(out))
    assert (out / "checkpoints" / str(done)).is_dir() and not (out / "adapter").exists()
    resumed = stage1(out, "--max_steps", str(done + 1), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(losses(out)) == done + 1 and (out / "adapter" / "adapter_meta.json").is_file()


# ---------------------------------------------------------------------------------------------- bad input
def _main(argv, capsys) -> tuple[int, str]:
    from train.stage1 import main

    code = main(argv)
    return code, capsys.readouterr().err


def test_mesh_not_matching_device_count(tmp_path, capsys):
    code, err = _main([*FAST, "--output_dir", str(tmp_path), "--mesh", "3,1,1"], capsys)
    assert code == 2 and "needs 3 devices but 8 are available" in err and "Traceback" not in err


def test_batch_not_divisible_by_data_axes(tmp_path, capsys):
    code, err = _main([*FAST, "--output_dir", str(tmp_path), "--mesh", "8,1,1", "--micro_batch_size", "1"], capsys)
    assert code == 2 and "not divisible by the data axes data x fsdp = 8" in err


def test_resume_without_checkpoint(tmp_path, capsys):
    code, err = _main([*FAST, "--output_dir", str(tmp_path / "empty"), "--mesh", "2,1,4", "--resume"], capsys)
    assert code == 2 and "--resume: no checkpoint found in" in err


def test_corrupt_checkpoint(tmp_path, capsys, runs):
    _, split = runs
    broken = tmp_path / "broken"
    shutil.copytree(split, broken)
    for path in (broken / "checkpoints" / "6" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "manifest" in path.name or path.suffix == "":
            if path.is_file():
                path.write_bytes(b"\0garbage")
    code, err = _main([*FAST, "--output_dir", str(broken), "--mesh", "2,1,4", "--resume"], capsys)
    assert code == 2 and str(broken / "checkpoints" / "6") in err and "cannot restore" in err


@pytest.mark.slow
def test_resume_at_the_end_exports_and_changed_settings_are_refused(tmp_path, capsys, runs):
    _, split = runs
    done = tmp_path / "done"
    shutil.copytree(split, done)
    shutil.rmtree(done / "adapter")  # as if killed during the final export
    config_before = (done / "train_config.json").read_bytes()
    code, err = _main([*FAST, "--output_dir", str(done), "--mesh", "2,1,4", "--seed", "5"], capsys)
    assert code == 2 and "pass --resume" in err
    assert (done / "train_config.json").read_bytes() == config_before  # a refused run writes nothing
    code, err = _main([*FAST, "--output_dir", str(done), "--mesh", "2,1,4", "--resume", "--seed", "5"], capsys)
    assert code == 2 and "seed: 0 -> 5" in err and "Traceback" not in err
    code, err = _main([*FAST, "--output_dir", str(done), "--mesh", "2,1,4", "--resume", "--max_steps", "6",
                       "--remat", "dots"], capsys)  # a changed remat policy is accepted (it was full)
    assert code == 0, err
    assert (done / "adapter" / "adapter_meta.json").is_file() and len(losses(done)) == 6


@pytest.mark.parametrize("flags, message", [
    (["--keep_last", "0"], "--keep_last must be >= 1"),
    (["--learning_rate", "0"], "--learning_rate must be positive"),
    (["--save_steps", "0"], "--save_steps must be >= 1"),
    (["--lora_dropout", "1"], "--lora_dropout must be in [0, 1)"),
    (["--mesh", "0,-1,1"], "axis sizes must be positive"),
    (["--global_batch_size", "1000", "--micro_batch_size", "2"], "do not fill one --global_batch_size 1000"),
])
def test_bad_numeric_flags(flags, message, tmp_path, capsys):
    argv = [*FAST, "--output_dir", str(tmp_path / "o"), "--mesh", "2,1,4", *flags]
    code, err = _main(argv, capsys)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_dataset_failing_validation(tmp_path, capsys):
    bad = tmp_path / "data"
    shutil.copytree(SAMPLE, bad)
    qa = bad / "QA_Dataset" / "synth_0_000.json"
    data = json.loads(qa.read_text())
    del data[0][1]["info"]["relevance"]
    qa.write_text(json.dumps(data))
    argv = [*FAST, "--output_dir", str(tmp_path / "o"), "--mesh", "2,1,4"]
    argv[argv.index("--QA_path") + 1] = str(bad)
    code, err = _main(argv, capsys)
    assert code == 2 and "synth_0_000.json" in err and "relevance" in err
