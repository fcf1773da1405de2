"""Stage 1 (Historic Dialogue Retrieval) training run: data, the accumulating step, the loop (the batch geometry:
`stage1_geometry`). Each process feeds its slice of the rows of every micro-batch (see `run`).
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
from cogstream_jax.data.stage1 import stage1_items
from cogstream_jax.data.tokens import PAD_ID
from cogstream_jax.errors import ConfigError
from cogstream_jax.multihost import global_max
from cogstream_jax.sharding import make_mesh
from cogstream_jax.training import distributed, run_common
from cogstream_jax.training.batching import pad_length, stage1_step_batch
from cogstream_jax.training.loop import run_loop
from cogstream_jax.training.losses import allowed_mask
from cogstream_jax.training.optim import stage1_optim
from cogstream_jax.training.setup import build_setup
from cogstream_jax.training.stage1_geometry import (GRAD_PROGRAM, MIN_POSITIONS, POSITION_MULTIPLE, batch_geometry,
                                                    length_buckets)
from cogstream_jax.training.step import StepOptions, batch_sharding


def dataset_root(qa_path: str):
    """--QA_path may name the dataset root or its QA_Dataset folder (local, or an object-store URL)."""
    from cogstream_jax.io_utils import as_path

    path = as_path(qa_path)
    return path.parent if path.name == "QA_Dataset" else path


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
