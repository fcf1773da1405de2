"""Multi-controller import: 2 real JAX processes x 4 CPU devices (gloo) load one checkpoint onto a global mesh.

Every process reads the checkpoint and `jax.device_put` keeps only its addressable shards; each process checks its
shards against the slices of the tensors read back independently with the safetensors library.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from multihost_helpers import free_port
from xla_env import xla_flags
from weights_helpers import torch_model, write_native

REPO = pathlib.Path(__file__).resolve().parents[1]

WORKER = r"""
import json, os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import numpy as np
from flax import nnx
from safetensors.numpy import load_file
from cogstream_jax.sharding import make_mesh
from cogstream_jax.weights.keys import hf_key_table
from cogstream_jax.weights.loader import load_pretrained
model = load_pretrained(folder, mesh=make_mesh("2,2,2"))
tensors = load_file(os.path.join(folder, "model.safetensors"))
leaves = {tuple(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
checked = bad = 0
for key, entry in hf_key_table(model.config, "native").items():
    array, full = leaves[entry.our_path], entry.to_ours(tensors[key])
    assert array.shape == full.shape and len(array.sharding.device_set) == 8
    for shard in array.addressable_shards:
        checked += 1
        bad += not np.array_equal(np.asarray(shard.data), full[shard.index])
print(json.dumps({"process": pid, "devices": jax.device_count(), "local": jax.local_device_count(),
                  "checked": checked, "bad": bad}))
"""


@pytest.mark.slow
def test_two_processes_each_hold_their_correct_shards(tmp_path):
    folder = write_native(torch_model(), tmp_path / "native")
    port = str(free_port())
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS=xla_flags(4))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(pid), port, str(folder)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:  # a failed peer leaves the other waiting for the coordinator
            if proc.poll() is None:
                proc.kill()
    for pid, result in enumerate(results):
        assert result["process"] == pid and result["devices"] == 8 and result["local"] == 4
        assert result["checked"] > 0 and result["bad"] == 0, result
