"""Stage-2 CLI end to end (tiny random model, bundled sample): official flags, resolved config with the
official T_max, one update per 4 QAs, resume, the adapter directory with the projector targets."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = REPO / "cogstream_jax" / "assets" / "sample"
ARGS = ["--model_path", "tiny", "--video_dir", str(SAMPLE / "event_segments"), "--query_dir",
        str(SAMPLE / "QA_Dataset"), "--num_epochs", "1", "--dtype", "float32", "--no_progress", "--seed", "0"]


def _run(out: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "train.stage2", *ARGS, "--output-dir", str(out), *extra], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_stage2_cli_trains_resumes_and_writes_the_adapter(tmp_path):
    out = tmp_path / "s2"
    first = _run(out, "--max_steps", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run(out, "--max_steps", "2", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    config = json.loads((out / "train_config.json").read_text())
    assert config["t_max"] == 1 * 1 * 20 and config["videos"] == 3 and config["gradient_accumulation_steps"] == 4
    assert config["total_steps"] == config["qas"] // 4
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and metrics[0]["lr"] == pytest.approx(1e-4)
    assert all(m["loss"] > 0 and m["tokens"] > 0 for m in metrics)
    meta = json.loads((out / "adapter" / "adapter_meta.json").read_text())
    assert "model.mm_projector.readout.0" in json.dumps(meta)


def test_stage2_missing_video_dir_is_a_clear_error(tmp_path, capsys):
    from train.stage2 import main

    argv = [*ARGS, "--output_dir", str(tmp_path)]
    argv[argv.index("--video_dir") + 1] = str(tmp_path / "nope")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--video_dir" in err and "nope" in err and "Traceback" not in err


@pytest.mark.parametrize("value, message", [("0", "--gradient_accumulation_steps must be >= 1"),
                                            ("100000", "do not fill one update")])
def test_stage2_accumulation_that_cannot_train_is_refused(value, message, tmp_path, capsys):
    from train.stage2 import main

    assert main([*ARGS, "--output_dir", str(tmp_path), "--gradient_accumulation_steps", value]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
