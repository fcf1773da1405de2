"""Stage 2 multi-host for real: two processes on 127.0.0.1 (jax.distributed + gloo, 4 fake CPU devices each),
started from the README's JAX_* variables only, run update 1 of the QA stream on a (1, 4, 2) mesh (4 different QAs
per update, one per fsdp shard) and checkpoint it; one process with 8 devices resumes that run for update 2. Both
updates' losses and the final adapter equal the uninterrupted single-process 8-device run (so resuming across
process counts continues the same QA order and random draws). Seed 3 starts on the long sample video and --fps 3
samples 150 frames from its first part, so its QAs run question-aware event compression (> 135 frames): the event
scorer reads model outputs back to the host, which a sharded array spanning another process's devices does not
allow."""
from __future__ import annotations

import json

import pytest

from multihost_helpers import SAMPLE, assert_no_temp_leftovers, assert_same_adapters, metrics, run_multi, run_single

ARGS = ["--model_path", "tiny", "--video_dir", str(SAMPLE / "event_segments"), "--query_dir",
        str(SAMPLE / "QA_Dataset"), "--num_epochs", "1", "--dtype", "float32", "--no_progress", "--seed", "3",
        "--fps", "3", "--mesh", "1,4,2", "--global_batch_qas", "4", "--logging_steps", "1"]


@pytest.mark.slow
def test_stage2_two_processes_match_one_process(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    run_single("train.stage2", [*ARGS, "--max_steps", "2"], single)
    run_multi("train.stage2", [*ARGS, "--max_steps", "1"], multi, via="env")
    assert json.loads((multi / "train_config.json").read_text())["event_compression_active"] is True
    assert_no_temp_leftovers(multi)
    run_single("train.stage2", [*ARGS, "--max_steps", "2", "--resume"], multi)  # 2 processes -> 1

    a, b = metrics(single), metrics(multi)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5
        assert x["tokens"] == y["tokens"] > 0
    assert_same_adapters(single / "adapter", multi / "adapter")
