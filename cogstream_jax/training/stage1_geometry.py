"""Stage 1's batch geometry, shared by the run and compile-check (which must build the run's shapes without the
grain pipelines): padded row lengths, supervised positions, and the global batch cut into micro-batches.

Global batch = `global_batch_size` items (official 8 devices x 1 item x accumulation 4 = 32), split into
micro-batches of `micro_batch_size` items (default: one item per data-parallel device, fewer on meshes larger than
the global batch: the fewest whose rows split evenly over the devices) that the jitted step scans over.
"""
from __future__ import annotations

import argparse
import math

from cogstream_jax.data.stage1 import MAX_SAMPLES_PER_ITEM
from cogstream_jax.errors import ConfigError
from cogstream_jax.model.attention import pad_to_block
from cogstream_jax.training.step import check_rows_divisible, data_parallel_size

POSITION_MULTIPLE = 16
MIN_POSITIONS = 32  # stage-1 targets are short ("[yes,0,5]<|im_end|>"): one static size avoids retraces
BUCKET_CANDIDATES = (512, 768, 1024, 1536, 2048, 3072, 4096)
GRAD_PROGRAM = "stage1_grad"  # `step.make_stage1_grad`'s program: what --compiled_dir serves


def length_buckets(max_length: int) -> tuple[int, ...]:
    """Padded lengths: the standard ones below max_length, then max_length rounded up to the attention block
    (`attention.pad_to_block`: the fused kernels' tile, so batches need no padding inside attention)."""
    return tuple(b for b in BUCKET_CANDIDATES if b < max_length) + (pad_to_block(max_length),)


def default_micro_batch(dp: int, global_batch: int) -> int:
    """One item per data-parallel device when that divides the global batch; on larger meshes (a 64-chip pod
    and the default 32 items) the fewest items whose rows (4 per item) still split evenly over the devices."""
    if global_batch < 1 or global_batch % dp == 0:
        return dp
    step = dp // math.gcd(dp, MAX_SAMPLES_PER_ITEM)
    for micro in range(step, global_batch + 1, step):
        if global_batch % micro == 0:
            return micro
    return dp  # nothing fits: batch_geometry names the conflict


def batch_geometry(args: argparse.Namespace, mesh) -> tuple[int, int]:
    """(micro-batch items, accumulation steps), validated against the mesh."""
    dp = data_parallel_size(mesh)
    micro = args.micro_batch_size or default_micro_batch(dp, args.global_batch_size)
    if args.global_batch_size < 1 or micro < 1:
        raise ConfigError("--global_batch_size and --micro_batch_size must be >= 1")
    if args.global_batch_size % micro:
        raise ConfigError(f"--global_batch_size {args.global_batch_size} is not divisible by "
                          f"--micro_batch_size {micro}")
    check_rows_divisible(micro * MAX_SAMPLES_PER_ITEM, mesh, f"micro-batch rows (4 per item x {micro} items)")
    return micro, args.global_batch_size // micro
