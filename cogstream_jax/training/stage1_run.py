"""Stage 1 (Historic Dialogue Retrieval) training run: data, batch geometry, the accumulating step, the loop.

Global batch = `global_batch_size` items (official 8 devices x 1 item x accumulation 4 = 32), split into
micro-batches of `micro_batch_size` items (default: one item per data-parallel device, fewer on meshes larger than
the global batch: the fewest whose rows split evenly over the devices) that the jitted step
scans over. Each process feeds its slice of the rows of every micro-batch (see `run`).
"""
from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from cogstream_jax import compiled_store, lora
from cogstream_jax.data.dataset import load_dataset
from cogstream_jax.data.pipelines import Stage1Config, stage1_dataset
from cogstream_jax.data.processor_config import load_tokenizer
from cogstream_jax.data.selection import allowed_token_ids
from cogstream_jax.data.stage1 import MAX_SAMPLES_PER_ITEM, stage1_items
from cogstream_jax.data.tokens import PAD_ID
from cogstream_jax.errors import ConfigError
from cogstream_jax.model.attention import pad_to_block
from cogstream_jax.multihost import global_max
from cogstream_jax.sharding import make_mesh
from cogstream_jax.training import distributed, run_common
from cogstream_jax.training.batching import pad_length, stage1_step_batch
from cogstream_jax.training.loop import run_loop
from cogstream_jax.training.losses import allowed_mask
from cogstream_jax.training.optim import stage1_optim
from cogstream_jax.training.setup import build_setup
from cogstream_jax.training.step import StepOptions, batch_sharding, check_rows_divisible, data_parallel_size

POSITION_MULTIPLE = 16
MIN_POSITIONS = 32  # stage-1 targets are short ("[yes,0,5]<|im_end|>"): one static size avoids retraces
BUCKET_CANDIDATES = (512, 768, 1024, 1536, 2048, 3072, 4096)
GRAD_PROGRAM = "stage1_grad"  # `step.make_stage1_grad`'s program: what --compiled_dir serves


def length_buckets(max_length: int) -> tuple[int, ...]:
    """Padded lengths: the standard ones below max_length, then max_length rounded up to the attention block
    (`attention.pad_to_block`: the fused kernels' tile, so batches need no padding inside attention)."""
    return tuple(b for b in BUCKET_CANDIDATES if b < max_length) + (pad_to_block(max_length),)


def dataset_root(qa_path: str):
    """--QA_path may name the dataset root or its QA_Dataset folder (local, or an object-store URL)."""
    from cogstream_jax.io_utils import as_path

    path = as_path(qa_path)
    return path.parent if path.name == "QA_Dataset" else path


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


def run(args: argparse.Namespace) -> int:
    run_common.start(args)
    mesh = make_mesh(args.mesh)
    micro, accumulation = batch_geometry(args, mesh)
    # a folder this run cannot use fails now, not after loading the model
    executables = compiled_store.load(args.compiled_dir, GRAD_PROGRAM, mesh) if args.compiled_dir else None
    dataset = load_dataset(dataset_root(args.QA_path))
    n_items = len(stage1_items(dataset))
    if n_items * args.num_train_epochs < args.global_batch_size:
        raise ConfigError(f"{args.QA_path}: {n_items} stage-1 samples x {args.num_train_epochs} epoch(s) do not fill "
                          f"one --global_batch_size {args.global_batch_size}: nothing would be trained")
    total_steps = n_items * args.num_train_epochs // args.global_batch_size
    steps_per_epoch = max(1, n_items // args.global_batch_size)  # official: a checkpoint every epoch
    model, tokenizer_dir = run_common.load_model(args, mesh)
    tokenizer = load_tokenizer(tokenizer_dir)
    allowed = allowed_mask(allowed_token_ids(tokenizer), model.config.text.vocab_size)
    quantized = run_common.quantize_base(model, args.base_quant)
    spec = lora.LoraSpec(args.lora_r, args.lora_alpha, args.lora_dropout,
                         lora.language_module_spec(model.config).target_modules)
    optim = stage1_optim(total_steps, run_common.given(args.learning_rate, 2e-4))
    setup = build_setup(model, lora.LANGUAGE_MODULE, spec, optim, mesh, seed=args.seed,
                        options=StepOptions(remat=args.remat, dropout_rng=args.dropout_rng,
                                            scan_layers=not args.no_scan_layers))
    config = run_common.resolved_config(args, stage=1, items=n_items, total_steps=total_steps,
                                        learning_rate=optim.learning_rate,
                                        micro_batch_items=micro, accumulation_steps=accumulation,
                                        warmup_steps=optim.warmup_steps, quantized_kernels=quantized,
                                        mesh_shape=dict(mesh.shape))
    run_common.announce_config(args.output_dir, config)

    # Every process reads the whole global batch (tokenising is cheap) and keeps its slice of every micro-batch,
    # so the global [micro, rows] layout, and with it each row's LoRA-dropout mask, is the same for any number
    # of processes (a 2-host run equals the 1-host run).
    ds = stage1_dataset(dataset, tokenizer, Stage1Config(seed=args.seed, num_epochs=args.num_train_epochs,
                                                         max_length=args.max_length, batch_size=args.global_batch_size,
                                                         buckets=length_buckets(args.max_length)))
    iterator = iter(ds)
    step_fn = setup.accumulating_step(allowed)
    if executables is not None:
        step_fn.grad = compiled_store.ByShape(step_fn.grad, executables)
    rows = batch_sharding(mesh)

    def update(state, it):
        element = next(it)
        if element["input_ids"].shape[0] != args.global_batch_size:
            raise StopIteration  # the tail of the last epoch does not fill a global batch
        length = global_max(element["input_ids"].shape[-1])
        element = pad_length(element, length, PAD_ID)
        needed = int((np.asarray(element["labels"])[..., 1:] != -100).sum(-1).max())
        rounded = math.ceil(needed / POSITION_MULTIPLE) * POSITION_MULTIPLE
        positions = global_max(max(MIN_POSITIONS, rounded))
        batch = stage1_step_batch(element, accumulation, positions)
        return step_fn(state, setup.frozen, distributed.global_from_host(batch, rows))

    result = run_loop(setup, update, iterator, output_dir=args.output_dir, total_steps=total_steps,
                      resume=args.resume, max_steps=args.max_steps,
                      save_steps=run_common.given(args.save_steps, steps_per_epoch), keep_last=args.keep_last,
                      meta={"stage": 1, "run": run_common.run_fingerprint(config)},
                      show_progress=not args.no_progress, desc="stage1")
    if isinstance(step_fn.grad, compiled_store.ByShape):
        print(f"stage 1: gradient programs: {step_fn.grad.summary()}", file=sys.stderr)
    if result.exit_code == 0:
        run_common.export_adapter(setup.model(), lora.LANGUAGE_MODULE, args.output_dir)
    return result.exit_code
