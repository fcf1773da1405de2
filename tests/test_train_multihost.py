"""Multi-host for real: two processes on 127.0.0.1 (jax.distributed + gloo CPU collectives, 4 fake devices
each), started from the README's JAX_* variables only, train 3 stage-1 updates on a (2, 2, 2) mesh and match the
single-process 8-device run: losses, the final checkpoint and the final adapter directory (which every process
helps write), with their gradient executables saved by a two-process compile (`--compiled_dir`) and a shared
compilation cache. The project's own flags (--coordinator_address ...) resolve to the same jax.distributed call;
tests/test_distributed_startup.py checks how flags, COGSTREAM_* and JAX_* variables resolve."""
from __future__ import annotations

import pathlib

import numpy as np
import pytest

from multihost_helpers import (SAMPLE, assert_no_temp_leftovers, assert_same_adapters, launch, metrics, run_multi,
                              run_single)

ARGS = ["--model_path", "tiny", "--QA_path", str(SAMPLE), "--global_batch_size", "4", "--max_length", "576",
        "--dtype", "float32", "--num_train_epochs", "1", "--no_progress", "--seed", "0",
        "--max_steps", "3", "--save_steps", "3"]
MESH = "2,2,2"  # data and fsdp split the rows over both processes


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
    single, multi = tmp_path / "single", tmp_path / "multi"
    run_single("train.stage1", [*ARGS, "--mesh", MESH], single)
    # the two processes take their gradients from executables that two processes compiled with compile-check's
    # code (the CPU analogue of a pod slice's compile-only devices: the same device ids), and name one folder for
    # JAX's persistent compilation cache (process 0 writes it, reports once)
    compiled, cache = tmp_path / "compiled", tmp_path / "xla"
    launch(["tests.two_process_compile", str(compiled), "576", "4", MESH])
    errors = run_multi("train.stage1", [*ARGS, "--mesh", MESH, "--compiled_dir", str(compiled),
                                        "--compilation_cache_dir", str(cache)], multi, via="env")
    for err in errors:
        summary = [line for line in err.splitlines() if line.startswith("stage 1: gradient programs: ")]
        assert len(summary) == 1 and summary[0].endswith("(of 2 there), 0 compiled"), err[-3000:]
        assert "not taken" not in err and not summary[0].startswith("stage 1: gradient programs: 0 taken")
    assert [f"compilation cache {cache}: " in e for e in errors] == [True, False]  # reported once
    assert any(p.name.startswith("jit_apply-") for p in cache.iterdir())  # the optimiser update, compiled

    a, b = metrics(single), metrics(multi)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5
        assert x["tokens"] == y["tokens"]
    pa, pb = _restore(single), _restore(multi)
    assert pa.keys() == pb.keys()
    for key in pa:
        assert np.abs(pa[key] - pb[key]).max() <= 1e-5, key
    assert_same_adapters(single / "adapter", multi / "adapter")
    assert_no_temp_leftovers(multi)
