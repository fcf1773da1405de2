"""Stage 2 multi-host for real: two processes on 127.0.0.1 (jax.distributed + gloo, 4 fake CPU devices each),
started from the README's JAX_* variables only, run update 1 of the QA stream on a (1, 2, 4) mesh (2 different QAs
per update, one per fsdp shard) and checkpoint it; one process with 4 devices resumes that run for update 2 on a
(1, 1, 4) mesh (two calls of 1 QA accumulated). Both updates' losses and the final adapter equal the
uninterrupted single-process 8-device run (so resuming across process counts and device counts continues the same
QA order and random draws; so does preparing several QAs at once, `--prep_workers`). Seed 3 starts on the long
sample video and --fps 3 samples 150 frames from its first part, so its QAs run question-aware event compression
(> 135 frames): the event scorer reads model outputs back to the host, which a sharded array spanning another
process's devices does not allow."""
from __future__ import annotations

import json
import shutil

import pytest

from cogstream_jax.training import stage2_buckets as sb
from multihost_helpers import (SAMPLE, assert_no_temp_leftovers, assert_same_adapters, metrics, run_multi, run_single,
                               start)

ARGS = ["--model_path", "tiny", "--video_dir", str(SAMPLE / "event_segments"), "--query_dir",
        str(SAMPLE / "QA_Dataset"), "--num_epochs", "1", "--dtype", "float32", "--no_progress", "--seed", "3",
        "--fps", "3", "--mesh", "1,2,4", "--global_batch_qas", "2", "--logging_steps", "1", "--bucket_scan_qas", "3"]


@pytest.mark.slow
def test_stage2_two_processes_match_one_process(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    run_single("train.stage2", [*ARGS, "--max_steps", "2"], single)
    # several QAs prepared at once (here and in the resumed run) change nothing
    errors = run_multi("train.stage2", [*ARGS, "--max_steps", "1", "--prep_workers", "2"], multi, via="env")
    # each process prepared only the QA of its own row: one of the update's two
    for i, err in enumerate(errors):
        assert f"stage 2, process {i}: prepared 1 of the 2 QAs read" in err, err[-2000:]
    assert json.loads((multi / "train_config.json").read_text())["event_compression_active"] is True
    assert_no_temp_leftovers(multi)
    scanned = json.loads((multi / "train_config.json").read_text())["token_ladder"]
    # 2 processes x 4 devices -> 1 process x 4 devices: data x fsdp 2 -> 1, so 2 calls accumulate per update
    err = run_single("train.stage2", [*ARGS, "--max_steps", "2", "--resume", "--mesh", "1,1,4", "--prep_workers", "3"],
                     multi, devices=4)
    assert "as the resumed checkpoint's run chose them (no scan)" in err  # the buckets, and so the programs

    a, b = metrics(single), metrics(multi)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5
        assert x["tokens"] == y["tokens"] > 0
    assert_same_adapters(single / "adapter", multi / "adapter")
    # the resolved config (official T_max = 1 epoch x ceil(3 videos / 4) x 20, in updates of 2 QAs: x 4 / 2), the run's
    # own log, the adapter
    config = json.loads((multi / "train_config.json").read_text())
    assert config["t_max"] == 1 * 1 * 20 * 4 // 2 and config["videos"] == 3 and config["global_batch_qas"] == 2
    assert config["total_steps"] == config["qas"] // 2 and config["accumulation_steps"] == 2
    assert b[0]["lr"] == pytest.approx(1e-4) and all(m["loss"] > 0 for m in b)
    # --token_buckets auto (each process scanning the same first QAs, the resumed run reading them from the
    # checkpoint): sizes chosen from the scanned QA lengths, then the fixed ladder above them
    ladder = config["token_ladder"]
    assert ladder == scanned
    assert ladder == sorted(ladder) and all(n % 128 == 0 for n in ladder) and ladder[-1] == sb.TOKEN_BUCKETS[-1]
    # model-sized programs (vision chunk + gradient buckets + event scoring), compiled or read back from the suite's
    # persistent cache, and padding stay bounded
    models, grads = (b[0][f"{kind}_programs_compiled"] + b[0][f"{kind}_programs_read_back"]
                     for kind in ("model", "gradient"))
    assert 2 <= models <= 6 and 0 <= b[0]["padding_overhead"] <= 0.5
    assert 1 <= grads <= models - 1  # the vision chunk too
    meta = json.loads((multi / "adapter" / "adapter_meta.json").read_text())
    assert "model.mm_projector.readout.0" in json.dumps(meta)


#: a hang here (processes waiting in a collective) would last until JAX's runtime aborts them (~5 min)
FAILURE_TIMEOUT_S = 240


@pytest.mark.slow
@pytest.mark.parametrize("buckets", ["ladder", "auto"])
def test_a_bad_video_on_one_process_stops_every_process_with_one_line(tmp_path, buckets):
    """Seed 1 reads synth_0_001's QAs in order: the first call's two read segment 1 only, the second call's second
    row (process 1's) also reads segment 2, which is not a video here. Process 1 stops naming the file; process 0,
    which prepared its own row of that call, learns it from the call's first all-gather and stops too (instead of
    waiting in the collective process 1 never joins until JAX's runtime notices the dead peer). With the ladder
    that is update 2; with `--token_buckets auto` the bucket scan's second call, before any update."""
    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data)
    bad = data / "event_segments" / "synth_0_001" / "synth_0_001_segment_2.mp4"
    bad.write_bytes(b"not a video" * 300)
    moved = {str(SAMPLE / name): str(data / name) for name in ("event_segments", "QA_Dataset")}
    args = [moved.get(a, a) for a in ARGS]
    args[args.index("--seed") + 1], args[args.index("--fps") + 1] = "1", "1"
    args += ["--token_buckets", buckets, "--bucket_scan_qas", "4", "--max_steps", "3",
             "--output_dir", str(tmp_path / "out")]
    (code0, err0), (code1, err1) = start(["train.stage2", *args], timeout=FAILURE_TIMEOUT_S)
    last = [err.strip().splitlines()[-1] for err in (err0, err1)]
    assert code1 == 2 and last[1].startswith(f"error: {bad}: cannot be read as a video"), err1[-2000:]
    assert code0 == 2 and last[0] == ("error: stage 2: process 1 could not prepare its QAs of this call (its own "
                                      "error names the input); stopping with it"), err0[-2000:]
    assert "Traceback" not in err0 + err1
    trained = [m["step"] for m in metrics(tmp_path / "out")] if (tmp_path / "out" / "metrics.jsonl").exists() else []
    assert trained == ([1] if buckets == "ladder" else [])  # update 1 trained and logged; the scan trains nothing
