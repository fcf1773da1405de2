"""Training steps split their work over the devices instead of repeating it: XLA's FLOP count per device, times the
device count, is the one-device count on data and fsdp meshes of fake CPU devices (all micro-batches unrolled,
since XLA counts a loop's body once). The tensor axis repeats a little work on each of its ranks (+10% of the tiny
model's step at tensor=2, +6% at 4x its width: the share shrinks with the model; not broken down further). And
compile-check's stage-1 FLOPs count every micro-batch of the step."""
from __future__ import annotations

import dataclasses

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
