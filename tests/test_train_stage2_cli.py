"""Stage-2 CLI end to end (tiny random model, bundled sample): official flags, resolved config with the
official T_max (in updates of --global_batch_qas), resume on another device count, the run's own compile
count and padding overhead, the adapter directory with the projector targets."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from multihost_helpers import _env as subprocess_env

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = REPO / "cogstream_jax" / "assets" / "sample"
ARGS = ["--model_path", "tiny", "--video_dir", str(SAMPLE / "event_segments"), "--query_dir",
        str(SAMPLE / "QA_Dataset"), "--num_epochs", "1", "--dtype", "float32", "--no_progress", "--seed", "0"]


def _run(out: pathlib.Path, *extra: str, devices: int = 1) -> subprocess.CompletedProcess:
    env = subprocess_env(devices)
    return subprocess.run([sys.executable, "-m", "train.stage2", *ARGS, "--output-dir", str(out), *extra], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=900)


def test_stage2_missing_video_dir_is_a_clear_error(tmp_path, capsys):
    from train.stage2 import main

    argv = [*ARGS, "--output_dir", str(tmp_path)]
    argv[argv.index("--video_dir") + 1] = str(tmp_path / "nope")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--video_dir" in err and "nope" in err and "Traceback" not in err


@pytest.mark.slow
def test_stage2_resumes_on_4_devices_a_run_started_on_8(tmp_path):
    """Same QA order and random draws on another device count: update 2 of an 8-device run resumed on 4 devices
    equals update 2 of an uninterrupted 8-device run (4 QAs per update over data 4, then data 2 x 2 calls)."""
    common = ("--global_batch_qas", "4", "--logging_steps", "1")
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert _run(whole, "--max_steps", "2", *common, "--mesh", "4,1,2", devices=8).returncode == 0
    first = _run(split, "--max_steps", "1", *common, "--mesh", "4,1,2", devices=8)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run(split, "--max_steps", "2", "--resume", *common, "--mesh", "2,1,2", devices=4)
    assert second.returncode == 0, second.stderr[-3000:]
    a = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2]
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"] > 0
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * x["loss"] and abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5
    from multihost_helpers import assert_same_adapters

    assert_same_adapters(whole / "adapter", split / "adapter")
    # the resolved config (official T_max in updates of --global_batch_qas), the run's own log, the adapter
    config = json.loads((split / "train_config.json").read_text())
    assert config["t_max"] == 1 * 1 * 20 and config["videos"] == 3 and config["global_batch_qas"] == 4
    assert config["total_steps"] == config["qas"] // 4 and config["accumulation_steps"] == 2
    assert b[0]["lr"] == pytest.approx(1e-4) and all(m["loss"] > 0 for m in b)
    # model-sized programs (vision chunk + gradient buckets) and padding stay bounded
    assert 2 <= b[0]["model_programs_compiled"] <= 4 and 0 <= b[0]["padding_overhead"] <= 0.5
    meta = json.loads((split / "adapter" / "adapter_meta.json").read_text())
    assert "model.mm_projector.readout.0" in json.dumps(meta)


@pytest.mark.parametrize("extra, message", [
    (("--global_batch_qas", "0"), "must be >= 1"),
    (("--global_batch_qas", "100000", "--mesh", "1,8,1"), "do not fill one update"),
    (("--global_batch_qas", "6", "--mesh", "4,1,2"), "--global_batch_qas 6 is not a multiple of"),
    (("--global_batch_qas", "8", "--mesh", "2,2,2", "--qas_per_device", "3"), "= 12"),
])
def test_stage2_global_batch_that_cannot_train_is_refused(extra, message, tmp_path, capsys):
    from train.stage2 import main

    assert main([*ARGS, "--output_dir", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
