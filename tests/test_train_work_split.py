"""Training steps split their work over the devices instead of repeating it: XLA's FLOP count per device, times the
device count, is the one-device count on data and fsdp meshes of fake CPU devices (all micro-batches unrolled,
since XLA counts a loop's body once). The tensor axis repeats a little work on each of its ranks (+10% of the tiny
model's step at tensor=2, +6% at 4x its width: the share shrinks with the model; not broken down further). And
compile-check's stage-1 FLOPs count every micro-batch of the step. FLOP counts cannot see a kernel (a custom
call) repeated on every device, nor rows gathered onto every device: the stage-2 gradient compiled for a TPU
topology is read for both."""
from __future__ import annotations

import collections
import dataclasses
import os
import re

import jax
import numpy as np
import pytest

from cogstream_jax.compilecheck.flops import unrolled_flops
from cogstream_jax.compilecheck.jobs import JobShape, has_loops, stage1_programs, stage2_programs
from cogstream_jax.compilecheck.report import program_flops
from cogstream_jax.config import tiny
from cogstream_jax.sharding import make_mesh

CONFIG = tiny(vocab_size=2048)
# 4 items of 4 rows: one device accumulates 4 micro-batches, 4 data-parallel devices take one each
SHAPE = JobShape(dtype="float32", attn_impl="xla", scan_layers=False, unroll_micro_batches=True,
                 global_batch_size=4, max_length=128)


def _mesh(text: str):
    size = int(np.prod([int(x) for x in text.split(",")]))
    return make_mesh(text, devices=jax.devices()[:size])


def _step_flops(mesh_text: str) -> tuple[float, int]:
    mesh = _mesh(mesh_text)
    (program,) = stage1_programs(CONFIG, SHAPE, mesh)
    return program_flops(program), mesh.devices.size


@pytest.fixture(scope="module")
def one_device() -> float:
    return _step_flops("1,1,1")[0]


@pytest.mark.parametrize("mesh_text, repeated", [("4,1,1", 0.0), ("1,4,1", 0.0), ("2,2,2", 0.13)])
def test_stage1_step_total_flops_do_not_grow_with_the_mesh(one_device, mesh_text, repeated):
    per_device, devices = _step_flops(mesh_text)
    assert per_device < one_device / 2  # each device does a share
    total = per_device * devices
    assert one_device * 0.98 <= total <= one_device * (1.02 + repeated), (total, one_device)


def test_compile_check_counts_every_micro_batch(one_device):
    """On one device the step accumulates 4 micro-batches in a loop: compile-check's count (1- and 2-layer
    compiles, loops unrolled) is the unrolled program's, not one micro-batch's."""
    mesh = _mesh("1,1,1")
    looped = dataclasses.replace(SHAPE, unroll_micro_batches=False)
    assert has_loops("stage1", looped, mesh)
    (counted,) = unrolled_flops(stage1_programs, CONFIG, looped, mesh, program_flops)
    assert abs(counted - one_device) <= 0.01 * one_device, (counted, one_device)
    (body_once,) = stage1_programs(CONFIG, looped, mesh)
    assert program_flops(body_once) < 0.5 * one_device  # what XLA reports for the loop itself


STAGE2 = JobShape(dtype="float32", attn_impl="xla", scan_layers=False, frames=4, grid=(4, 4), kept=10, tokens=128,
                  answer_tokens=16)


def _stage2_flops(mesh_text: str) -> list[tuple[int, float]]:
    """(examples per call, FLOPs per device) of the vision chunk and the gradient call."""
    return [(p.examples_per_step, program_flops(p)) for p in stage2_programs(CONFIG, STAGE2, _mesh(mesh_text))]


def test_stage2_calls_give_each_device_its_own_qa():
    """A call over data x fsdp devices carries as many QAs (and frames) as devices, each device the FLOPs of one."""
    (frames_1, vision_1), (qas_1, grad_1) = _stage2_flops("1,1,1")
    for mesh_text in ("4,1,1", "1,4,1"):
        (frames, vision), (qas, grad) = _stage2_flops(mesh_text)
        assert (frames, qas) == (4 * frames_1, 4 * qas_1)
        assert abs(vision - vision_1) <= 0.01 * vision_1 and abs(grad - grad_1) <= 0.01 * grad_1, mesh_text


_COLLECTIVE = re.compile(r"= (\S+) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\(")
_SPLASH = re.compile(r"%splash_mha_\w+?(?:\.\d+)? = (.*?) custom-call\(")


def _tpu_stage2_grad(devices: int) -> str:
    """The compiled HLO (per device) of the tiny stage-2 gradient, splash attention, fsdp over `devices` v5e chips."""
    from cogstream_jax.compilecheck.devices import compile_only_devices
    from cogstream_jax.compilecheck.hardware import target
    from cogstream_jax.compilecheck.report import no_persistent_cache

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    chips = compile_only_devices(target("v5e-4"))[:devices]
    shape = JobShape(frames=4, grid=(4, 4), kept=10, tokens=200, answer_tokens=16, event_compression=False)
    _, grad = stage2_programs(tiny(), shape, make_mesh(f"1,{devices},1", chips))
    with no_persistent_cache():  # as compile-check: compile-only executables cannot be read back from the cache
        return grad.lower().compile().as_text()


def test_stage2_rows_stay_on_their_device_on_a_tpu_topology():
    """4 QAs over 4 v5e chips (fsdp=4): each chip runs the splash kernels on its own QA only (the kernels' per-device
    shapes are those of one chip holding the only QA), and no collective moves rows of activations (a [4 rows, 256
    tokens, ...] float array): FSDP gathers weights, never the other chips' QAs. Neither held before the gradient's
    vmap named the mesh axes its rows are split over: every chip attended for all 4 QAs and XLA gathered their
    activations (a 7B compile at fsdp=16 held 16 QAs' [16384, 18944] MLP intermediates on every chip)."""
    one, four = _tpu_stage2_grad(1), _tpu_stage2_grad(4)
    kernels = [collections.Counter(_SPLASH.findall(hlo)) for hlo in (one, four)]
    assert kernels[0] and kernels[0].keys() == kernels[1].keys(), kernels
    moved = [m.group(1) for m in _COLLECTIVE.finditer(four)]
    assert moved, "fsdp=4 gathers weights"
    rows_of_activations = [s for s in moved if re.match(r"\(?(bf16|f32)\[4,(1,)?256[,\]]", s)]
    assert not rows_of_activations, rows_of_activations
