"""Multi-host for real: two processes on 127.0.0.1 (jax.distributed + gloo CPU collectives, 4 fake devices
each) train 3 stage-1 updates on a (2, 2, 2) mesh and match the single-process 8-device run."""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = REPO / "cogstream_jax" / "assets" / "sample"
ARGS = ["--model_path", "tiny", "--QA_path", str(SAMPLE), "--global_batch_size", "4", "--max_length", "576",
        "--dtype", "float32", "--num_train_epochs", "1", "--no_progress", "--seed", "0", "--mesh", "2,2,2",
        "--max_steps", "3", "--save_steps", "3"]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(out: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _restore(out: pathlib.Path):
    from flax import nnx

    from cogstream_jax import config as configs, lora
    from cogstream_jax.model.videollama3 import VideoLlama3
    from cogstream_jax.sharding import make_mesh
    from cogstream_jax.training.checkpoint import TrainCheckpointer
    from cogstream_jax.training.optim import stage1_optim
    from cogstream_jax.training.setup import build_setup

    model = VideoLlama3(configs.tiny(), rngs=nnx.Rngs(0))
    setup = build_setup(model, lora.LANGUAGE_MODULE, lora.language_module_spec(model.config), stage1_optim(29),
                        make_mesh("2,2,2"), seed=0)
    ckpt = TrainCheckpointer(out / "checkpoints")
    state = ckpt.restore(setup.state, setup.state_sharding)
    ckpt.close()
    return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(state.params)}


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    single = tmp_path / "single"
    one = subprocess.run([sys.executable, "-m", "train.stage1", *ARGS, "--output_dir", str(single)], env=_env(8),
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]

    multi = tmp_path / "multi"
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "train.stage1", *ARGS, "--output_dir", str(multi),
                               "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                               "--process_id", str(i)], env=_env(4), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=900))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    config = json.loads((multi / "train_config.json").read_text())
    assert config["jax"] == {"devices": 8, "processes": 2, "backend": "cpu"}

    a, b = _metrics(single), _metrics(multi)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5
        assert x["tokens"] == y["tokens"]
    pa, pb = _restore(single), _restore(multi)
    assert pa.keys() == pb.keys()
    for key in pa:
        assert np.abs(pa[key] - pb[key]).max() <= 1e-5, key
