"""Shared pieces of the multi-process training tests: one CLI run on 8 fake CPU devices in one process, the same
run as 2 real JAX processes x 4 fake devices on 127.0.0.1 (jax.distributed + gloo), and comparisons of what both
leave in their output folders (metrics.jsonl, the final adapter directory)."""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
from typing import Sequence

import numpy as np

from xla_env import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = REPO / "cogstream_jax" / "assets" / "sample"
TIMEOUT_S = 900


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_single(module: str, args: Sequence[str], out: pathlib.Path, devices: int = 8, *,
               persistent_cache: bool = True) -> str:
    """`python -m <module> <args> --output_dir <out>` in one process with `devices` fake CPU devices (its stderr);
    `persistent_cache=False`: every program compiled, none read back from the test suite's compilation cache."""
    env = clean_env(devices)
    if not persistent_cache:
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-m", module, *args, "--output_dir", str(out)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"jax runtime: process 0 of 1, {devices} local / {devices} global cpu devices" in done.stderr
    return done.stderr


JAX_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "COGSTREAM_COORDINATOR",
            "COGSTREAM_NUM_PROCESSES", "COGSTREAM_PROCESS_ID", "COGSTREAM_INIT_TIMEOUT")


def clean_env(devices: int) -> dict[str, str]:
    """`_env` without any variable that would make a process join a runtime by itself."""
    env = _env(devices)
    for name in JAX_VARS:
        env.pop(name, None)
    return env


def launch(argv: Sequence[str], processes: int = 2, devices: int = 4, via: str = "env") -> list[str]:
    """`python -m <argv>` as `processes` cooperating JAX processes with `devices` fake CPU devices each, told about
    each other by the README's JAX_* variables only (`via="env"`) or by the project's flags (`via="flags"`);
    every process must succeed and log the runtime it joined. Returns their stderr."""
    results = start(argv, processes, devices, via)
    for i, (code, err) in enumerate(results):
        assert code == 0, f"process {i}: {err[-3000:]}"
        assert f"jax runtime: process {i} of {processes}, {devices} local / {processes * devices} global cpu" in err
    return [err for _, err in results]


def start(argv: Sequence[str], processes: int = 2, devices: int = 4, via: str = "env",
          timeout: float = TIMEOUT_S) -> list[tuple[int, str]]:
    """The processes of `launch`, waited for (each up to `timeout` s, then killed and the wait raises): (exit
    code, stderr) of each, whatever they are."""
    port = free_port()
    procs = []
    for i in range(processes):
        env, extra = clean_env(devices), []
        if via == "env":
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                       JAX_PROCESS_ID=str(i))
        else:
            extra = ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(processes),
                     "--process_id", str(i)]
        procs.append(subprocess.Popen([sys.executable, "-m", *argv, *extra], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[1])
    finally:
        for p in procs:  # a failed peer leaves the others waiting for the coordinator
            if p.poll() is None:
                p.kill()
    return [(p.returncode, err) for p, err in zip(procs, outputs)]


def run_multi(module: str, args: Sequence[str], out: pathlib.Path, processes: int = 2, devices: int = 4,
              via: str = "flags") -> list[str]:
    """The same training command as `processes` cooperating JAX processes (see `launch`); their stderr."""
    errors = launch([module, *args, "--output_dir", str(out)], processes, devices, via)
    config = json.loads((out / "train_config.json").read_text())
    assert config["jax"] == {"devices": processes * devices, "processes": processes, "backend": "cpu"}
    return errors


def metrics(out: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_adapters(a: pathlib.Path, b: pathlib.Path, tol: float = 1e-5) -> None:
    """Both adapter directories hold the same metadata (but the stamp) and the same tensors within `tol`."""
    from cogstream_jax.adapter_io import read_adapter_tensors

    meta_a, tensors_a = read_adapter_tensors(a)
    meta_b, tensors_b = read_adapter_tensors(b)
    assert meta_a == meta_b
    assert tensors_a.keys() == tensors_b.keys() and tensors_a
    for module, pair in tensors_a.items():
        for x, y in zip(pair, tensors_b[module]):
            assert x.shape == y.shape and np.abs(x - y).max() <= tol, module


def assert_no_temp_leftovers(out: pathlib.Path) -> None:
    """Atomic writes leave no temp siblings (`.adapter.tmp-*`, `.adapter.old-*`, `.*.tmp`) behind."""
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers
