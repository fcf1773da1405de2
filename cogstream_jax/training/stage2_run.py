"""Stage 2 (video-text interleave reasoning) training run: one QA per forward over the growing conversation,
one optimiser update per `accumulation` (4) QAs, a checkpoint every 30 updates (official cadence).

Every process runs the same QA stream (batch 1 cannot be split over data-parallel devices); the mesh shards
the model (fsdp / tensor) and the data axis only replicates. In multi-process runs each process places its
(identical) host arrays with `jax.device_put` onto the global replicated sharding, and the event scorer's
host reads gather shards owned by other processes (`multihost.to_host`; tests/test_train_stage2_multihost.py). A trailing group of fewer than
`accumulation` QAs at the very end of training is dropped.
"""
from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cogstream_jax import lora
from cogstream_jax.data.dataset import QA_DIR, SEGMENTS_DIR, VQA_DIR, load_dataset
from cogstream_jax.data.pipelines import Stage2Config, stage2_dataset
from cogstream_jax.data.processor import Processor
from cogstream_jax.errors import ConfigError
from cogstream_jax.model.vision import VisualLayout
from cogstream_jax.sharding import make_mesh
from cogstream_jax.training import run_common
from cogstream_jax.training.loop import run_loop
from cogstream_jax.training.optim import stage2_optim
from cogstream_jax.training.setup import build_setup
from cogstream_jax.training.stage2_batches import build_stage2_batch, event_compression_available
from cogstream_jax.training.state import replicated
from cogstream_jax.training.step import StepOptions, add_grads_jit


def dataset_root(query_dir: str, video_dir: str) -> pathlib.Path:
    """The dataset root holding QA_Dataset/ and event_segments/; linked together in a temp folder if the two
    flags do not point at siblings with the standard names."""
    query, video = pathlib.Path(query_dir).absolute(), pathlib.Path(video_dir).absolute()
    for flag, path in (("--query_dir", query), ("--video_dir", video)):
        if not path.is_dir():
            raise ConfigError(f"{flag} {path}: folder not found")
    if query.name == QA_DIR and video == query.parent / SEGMENTS_DIR:
        return query.parent
    root = pathlib.Path(tempfile.mkdtemp(prefix="cogstream-stage2-"))
    os.symlink(query, root / QA_DIR)
    os.symlink(video, root / SEGMENTS_DIR)
    vqa = query.parent / VQA_DIR
    if vqa.is_dir():
        os.symlink(vqa, root / VQA_DIR)
    return root


def count_qas(dataset, config: Stage2Config) -> int:
    """QAs the stream yields over all epochs (the chain draws are deterministic for the seed)."""
    return sum(1 for _ in stage2_dataset(dataset, config))


def event_scorer(setup, state, tokenizer, seed: int):
    """Question-aware event scoring with the current adapter (protocol 6.1-6.2), outside the gradient: it only
    decides which frames are minor; the pooling of those frames happens inside the differentiated step."""
    from cogstream_jax.inference.events import compress_events, should_compress

    model = setup.model(state)
    key = jax.random.fold_in(jax.random.key(seed), int(jax.device_get(state.step)))

    def minor_frames(out, question: str):
        if not should_compress(out.num_frames):
            return ()
        layout = VisualLayout.from_arrays(out.grid_sizes, out.merge_sizes)
        features = _encode(setup.split.graphdef, state.params, setup.frozen, jnp.asarray(out.pixel_values), layout)
        return compress_events(model, tokenizer, features, out.timestamps, question, key).minor_frames

    return minor_frames


@functools.partial(jax.jit, static_argnums=(0, 4))
def _encode(graphdef, params, frozen, pixel_values, layout):
    return jax.lax.stop_gradient(nnx.merge(graphdef, params, frozen).encode_visual(pixel_values, layout))


def run(args: argparse.Namespace) -> int:
    run_common.start(args)
    if args.num_epochs < 1:
        raise ConfigError(f"--num_epochs must be >= 1, got {args.num_epochs}")
    mesh = make_mesh(args.mesh)
    dataset = load_dataset(dataset_root(args.query_dir, args.video_dir))
    data_config = Stage2Config(seed=args.seed, num_epochs=args.num_epochs, fps=args.fps, max_frames=args.max_frames)
    total_qas = count_qas(dataset, data_config)
    if total_qas < args.gradient_accumulation_steps:
        raise ConfigError(f"{args.query_dir}: {total_qas} QAs over all epochs do not fill one update of "
                          f"--gradient_accumulation_steps {args.gradient_accumulation_steps}: nothing would be trained")
    total_steps = total_qas // args.gradient_accumulation_steps
    model, tokenizer_dir = run_common.load_model(args, mesh)
    processor = Processor.from_pretrained(tokenizer_dir, cache_frames=True, threads=args.decode_threads)
    quantized = run_common.quantize_base(model, args.base_quant)
    events = args.event_compression and event_compression_available()
    if args.event_compression and not events:
        print("note: event compression (cogstream_jax.inference.events) is not available in this build; "
              "stage 2 trains with DiffFP only", file=sys.stderr)
    # (event compression only acts on streams above 135 frames, inference.events.should_compress)
    spec = lora.LoraSpec(args.lora_r, args.lora_alpha, args.lora_dropout,
                         lora.full_module_spec(model.config).target_modules)
    optim = stage2_optim(args.num_epochs, len(dataset.videos), run_common.given(args.learning_rate, 1e-4))
    setup = build_setup(model, lora.FULL_MODULE, spec, optim, mesh, seed=args.seed,
                        options=StepOptions(remat=args.remat, dropout_rng=args.dropout_rng))
    config = run_common.resolved_config(args, stage=2, videos=len(dataset.videos), qas=total_qas,
                                        learning_rate=optim.learning_rate,
                                        total_steps=total_steps, t_max=optim.total_steps,
                                        event_compression_active=events, quantized_kernels=quantized,
                                        mesh_shape=dict(mesh.shape))
    run_common.announce_config(args.output_dir, config)

    grad_fn, apply_fn = setup.qa_grad(args.gradient_accumulation_steps), setup.apply()
    rep = replicated(mesh)

    def update(state, it):
        grads, losses, tokens = None, [], 0.0
        scorer = event_scorer(setup, state, processor.tokenizer, args.seed) if events else None
        for index in range(args.gradient_accumulation_steps):
            batch = build_stage2_batch(next(it), processor, minor_frames_fn=scorer)
            arrays = {k: jax.device_put(v, rep) for k, v in batch.arrays.items()}
            g, loss, count = grad_fn(state, setup.frozen, arrays, index, batch.layout, batch.num_kept)
            grads = g if grads is None else add_grads_jit(grads, g)
            losses.append(loss)
            tokens += batch.answer_tokens
        state, metrics = apply_fn(state, grads)
        return state, {**metrics, "loss": float(np.mean([float(x) for x in losses])), "tokens": tokens}

    iterator = iter(stage2_dataset(dataset, data_config))
    result = run_loop(setup, update, iterator, output_dir=args.output_dir, total_steps=total_steps,
                      resume=args.resume, max_steps=args.max_steps, save_steps=run_common.given(args.save_steps, 30),
                      keep_last=args.keep_last, meta={"stage": 2, "run": run_common.run_fingerprint(config)},
                      show_progress=not args.no_progress, desc="stage2")
    if result.exit_code == 0:
        run_common.export_adapter(setup.model(), lora.FULL_MODULE, args.output_dir)
    return result.exit_code
