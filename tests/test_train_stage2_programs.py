"""Issue 14's measurement as a test, from the run's own log: `train-stage2` on the bundled sample (tiny model, one
QA per update, 24 updates, one device, persistent compilation cache off) compiles every model-sized program before
its first update and none after, at most 6 of them gradient programs (one per token bucket), and pads under 20%
of the real tokens. (`bench/stage2_throughput.py` runs the same for 100 updates over the whole sample.)"""
from __future__ import annotations

import pytest

from multihost_helpers import SAMPLE, metrics, run_single

UPDATES = 24


@pytest.mark.slow
def test_a_bundled_sample_run_compiles_every_program_before_its_first_update(tmp_path):
    out = tmp_path / "out"
    args = ["--model_path", "tiny", "--video_dir", str(SAMPLE / "event_segments"), "--query_dir",
            str(SAMPLE / "QA_Dataset"), "--num_epochs", "1", "--dtype", "float32", "--no_progress",
            "--global_batch_qas", "1", "--max_steps", str(UPDATES), "--logging_steps", "1",
            "--bucket_scan_qas", str(UPDATES)]
    err = run_single("train.stage2", args, out, devices=1, persistent_cache=False)
    logged = [m for m in metrics(out) if "model_programs_compiled" in m]
    assert [m["step"] for m in logged] == list(range(1, UPDATES + 1))
    counts = {(m["model_programs_compiled"], m["gradient_programs_compiled"]) for m in logged}
    assert len(counts) == 1, counts  # the count logged after update 1 never grows
    (programs, gradients), = counts
    # the frozen vision chunk, event scoring when a QA of these needs it, one gradient per token bucket
    assert 1 <= gradients <= 6 and gradients + 1 <= programs <= gradients + 2
    assert f"stage 2: {int(gradients)} gradient programs" in err  # all of them before update 1
    assert 0 <= logged[-1]["padding_overhead"] <= 0.2
