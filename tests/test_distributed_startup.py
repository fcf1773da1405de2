"""Distributed start-up from the environment the README documents: two processes on 127.0.0.1 given only
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (no project flags) form one runtime (2 processes,
8 global fake CPU devices) in eval and split the videos (train-stage1 and train-stage2 start the same way in
test_train_multihost.py and test_train_stage2_multihost.py); flags win over the environment; an unreachable
coordinator or a malformed address is a one-line error, not a hang."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from multihost_helpers import JAX_VARS, REPO, SAMPLE, TIMEOUT_S, clean_env, free_port, launch
from cogstream_jax.errors import ConfigError
from cogstream_jax.training import distributed
from cogstream_jax.training.distributed import DistributedConfig

def _run_one(argv: list[str], devices: int = 8, extra_env: dict | None = None, timeout: float = TIMEOUT_S):
    env = clean_env(devices)
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", *argv], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


# --- resolution of the settings (no runtime is formed) ---------------------------------------------------------

def test_settings_flags_then_cogstream_then_jax_variables(monkeypatch):
    for name in JAX_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "detect_cluster", lambda: None)
    assert DistributedConfig.from_env() == DistributedConfig()
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert DistributedConfig.from_env() == DistributedConfig("10.0.0.1:1234", 4, 3, "flags/environment")
    monkeypatch.setenv("COGSTREAM_PROCESS_ID", "2")
    assert DistributedConfig.from_env().process_id == 2
    got = DistributedConfig.from_env("h:9", 2, 1)
    assert (got.coordinator_address, got.num_processes, got.process_id) == ("h:9", 2, 1)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "four")
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES must be an integer"):
        DistributedConfig.from_env()


def test_detected_cluster_joins_and_single_host_stays_alone(monkeypatch):
    for name in JAX_VARS:
        monkeypatch.delenv(name, raising=False)
    for name in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                 "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.detect_cluster() is None
    # one SLURM task: no runtime to form; two tasks: JAX's SLURM detection supplies the rest
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[1-2]")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.detect_cluster() is None
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed.detect_cluster() == "SlurmCluster"
    assert DistributedConfig.from_env().source == "cluster"


# --- bad input ---------------------------------------------------------------------------------------------------

STAGE1_FAST = ["--model_path", "tiny", "--QA_path", str(SAMPLE), "--global_batch_size", "4", "--max_length", "576",
               "--dtype", "float32", "--num_train_epochs", "1", "--no_progress", "--seed", "0", "--max_steps", "1"]


def test_unreachable_coordinator_is_a_clear_error_within_the_timeout(tmp_path):
    port = free_port()  # nobody listens there
    start = time.monotonic()
    done = _run_one(["train.stage1", *STAGE1_FAST, "--output_dir", str(tmp_path / "out")], devices=4,
                    extra_env={"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                               "JAX_PROCESS_ID": "1", "COGSTREAM_INIT_TIMEOUT": "3"}, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"cannot reach the JAX coordinator at 127.0.0.1:{port} within 3 s" in done.stderr
    assert time.monotonic() - start < 90


@pytest.mark.parametrize("address", ["no-port-here", "host:notaport", ":1234"])
def test_malformed_coordinator_address(tmp_path, address):
    done = _run_one(["train.stage1", *STAGE1_FAST, "--output_dir", str(tmp_path / "out")], devices=4,
                    extra_env={"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
                               "COGSTREAM_INIT_TIMEOUT": "3"}, timeout=120)
    assert done.returncode == 2 and "is not host:port" in done.stderr, done.stderr[-2000:]


# --- one runtime from the README's variables -------------------------------------------------------------------

@pytest.mark.slow
def test_eval_from_jax_variables_splits_videos_over_the_runtime(tmp_path):
    from cogstream_jax.data.synth import sample_dataset_dir

    query = tmp_path / "QA"
    query.mkdir()
    videos = ("synth_0_000", "synth_0_001")
    for name in videos:
        shutil.copy(sample_dataset_dir() / "QA_Dataset" / f"{name}.json", query / f"{name}.json")
    args = ["evaluate.answer_generate", "--model_path", "tiny", "--video_dir",
            str(sample_dataset_dir() / "event_segments"), "--query_dir", str(query), "--max_questions", "2",
            "--max_new_tokens", "4", "--no_progress", "--greedy"]
    done = _run_one([*args, "--save_dir", str(tmp_path / "one")], devices=4)
    assert done.returncode == 0, done.stderr[-3000:]
    errs = launch([*args, "--save_dir", str(tmp_path / "two")])
    # each process evaluated one video (the runtime's split), together both
    assert all("done: 1 videos (0 already finished)" in err for err in errs), errs
    for name in videos:
        assert (tmp_path / "one" / f"{name}.json").read_bytes() == (tmp_path / "two" / f"{name}.json").read_bytes()
