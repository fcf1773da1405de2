"""The jitted programs of each job, built by the job's own code from abstract inputs (no weights, no data).

stage1: the accumulated gradient (`TrainSetup.accumulating_step`'s, the program a run compiles per batch shape) of
        a full global batch at `--max_length`, or at each of `length_buckets`.
stage2: the bucketed gradient (`stage2_device.Stage2Device.grad`: data x fsdp QAs of the largest QA shape,
        `stage2_buckets.synthetic_qa` packed by the same `pack_call` as real QAs) and the frozen vision tower's
        chunk program.
eval:   the segment encoder's vision pass, the answer prefill at the largest prompt bucket (into an empty cache,
        as a stream's first question runs, and after a kept prefix, as later ones do) and the decode loop
        (`inference.segments`, `model.generate`), with both adapters loaded and the answer adapter active.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cogstream_jax import lora
from cogstream_jax.config import ModelConfig
from cogstream_jax.errors import ConfigError
from cogstream_jax.model.vision import VisualLayout
from cogstream_jax.model.videollama3 import VideoLlama3
from cogstream_jax.sharding import state_shardings
from cogstream_jax.training.setup import abstract_setup, with_shardings
from cogstream_jax.training.state import bind_attention
from cogstream_jax.training.step import StepOptions, batch_sharding

JOBS = ("stage1", "stage2", "eval")
SCANNED_JOBS = ("stage1", "stage2")  # training runs its layers as a scan (`scan_layers`); eval unrolls them


@dataclasses.dataclass(frozen=True)
class JobShape:
    """The job's flags that decide shapes and memory (defaults: the official recipes, largest inputs)."""

    dtype: str = "bfloat16"
    compute_dtype: str | None = None
    attn_impl: str = "auto"  # resolved for the target's platform (splash on TPU, cuDNN on GPU for bf16)
    remat: str | None = None  # None: the job's default
    scan_layers: bool = True  # decoder layers as one scan (the training default)
    unroll_micro_batches: bool = False  # stage 1's accumulation loop unrolled (FLOP counting only)
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    seed: int = 42
    # stage 1
    global_batch_size: int = 32
    micro_batch_size: int | None = None
    max_length: int = 2048
    length_buckets: tuple[int, ...] = ()  # stage 1: a gradient program per padded length; () = the longest
    # stage 2 / eval: one QA of `frames` frames at a `grid` patch grid, `kept` visual tokens after DiffFP
    frames: int = 180
    grid: tuple[int, int] = (14, 26)
    kept: int = 12285
    tokens: int = 13824
    answer_tokens: int = 256
    event_compression: bool = True
    token_buckets: tuple[int, ...] = ()  # stage 2: a gradient program per bucket (a run's planned ones); () = tokens
    # eval
    max_new_tokens: int = 1024


@dataclasses.dataclass
class Program:
    label: str  # what it is, for people ("stage-2 QA gradient")
    lower: Callable[[], Any]  # -> jax.stages.Lowered
    examples_per_step: int  # sequences (stage 1) or QAs one call processes
    runs_a_loop: bool = False  # a while loop of its own (the decode loop): XLA counts its body once, whatever we do
    trains: bool = False  # a training step with rematerialised decoder layers: what `--remat` changes


def model_builder(config: ModelConfig, shape: JobShape) -> Callable[[], VideoLlama3]:
    param = jnp.dtype(shape.dtype)
    compute = jnp.dtype(shape.compute_dtype) if shape.compute_dtype else param

    def build() -> VideoLlama3:
        model = VideoLlama3(config, rngs=nnx.Rngs(shape.seed), param_dtype=param, dtype=compute)
        model.attn_impl = shape.attn_impl
        return model

    return build


def _abstract(tree, sharding) -> Any:
    """ShapeDtypeStructs (placed by `sharding`) for a tree of arrays or shapes."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _options(shape: JobShape) -> StepOptions:
    remat = {} if shape.remat is None else {"remat": shape.remat}
    return StepOptions(scan_layers=shape.scan_layers, unroll_micro_batches=shape.unroll_micro_batches, **remat)


def _lora_spec(spec_fn, config: ModelConfig, shape: JobShape) -> lora.LoraSpec:
    return spec_fn(config, shape.lora_r, shape.lora_alpha, shape.lora_dropout)


def stage1_programs(config: ModelConfig, shape: JobShape, mesh: Mesh) -> list[Program]:
    from cogstream_jax.data.stage1 import MAX_SAMPLES_PER_ITEM
    from cogstream_jax.training.batching import stage1_step_batch
    from cogstream_jax.training.optim import stage1_optim
    from cogstream_jax.training.stage1_geometry import MIN_POSITIONS, batch_geometry, length_buckets

    micro, accumulation = batch_geometry(shape, mesh)
    setup = abstract_setup(model_builder(config, shape), lora.LANGUAGE_MODULE,
                           _lora_spec(lora.language_module_spec, config, shape), stage1_optim(1), mesh,
                           seed=shape.seed, options=_options(shape))
    step = setup.accumulating_step(np.ones(config.text.vocab_size, bool))
    items = shape.global_batch_size
    programs = []
    # default: the longest padded length a run can meet (--max_length rounded up to the attention block)
    for length in shape.length_buckets or length_buckets(shape.max_length)[-1:]:
        labels = np.full((items, MAX_SAMPLES_PER_ITEM, length), -100, np.int64)
        labels[..., 1:MIN_POSITIONS + 1] = 0
        element = {"input_ids": np.zeros((items, MAX_SAMPLES_PER_ITEM, length), np.int32), "labels": labels,
                   "attention_mask": np.ones((items, MAX_SAMPLES_PER_ITEM, length), np.int32)}
        batch = _abstract(stage1_step_batch(element, accumulation, MIN_POSITIONS), batch_sharding(mesh))
        programs.append(Program(f"stage-1 gradient ({accumulation} micro-batches x {micro} items, {length} tokens)",
                                functools.partial(step.lower, setup.state, setup.frozen, batch),
                                items * MAX_SAMPLES_PER_ITEM, trains=True))
    return programs


def stage2_layout(config: ModelConfig, shape: JobShape) -> VisualLayout:
    h, w = shape.grid
    merge = 2
    if h % merge or w % merge:
        raise ConfigError(f"--grid {h}x{w}: both sides must be even (2x2 merge)")
    return VisualLayout(((shape.frames, h, w),), (merge,))


def stage2_programs(config: ModelConfig, shape: JobShape, mesh: Mesh) -> list[Program]:
    from cogstream_jax.inference.events import should_compress
    from cogstream_jax.training import stage2_buckets as sb
    from cogstream_jax.training.optim import stage2_optim
    from cogstream_jax.training.stage2_device import Stage2Device

    setup = abstract_setup(model_builder(config, shape), lora.FULL_MODULE,
                           _lora_spec(lora.full_module_spec, config, shape), stage2_optim(1, 1), mesh,
                           seed=shape.seed, options=_options(shape))
    layout = stage2_layout(config, shape)
    events = shape.event_compression and should_compress(shape.frames)
    minor = tuple(range(1, shape.frames, 2)) if events else ()
    device = Stage2Device(setup)
    qa = sb.synthetic_qa(layout, shape.tokens, shape.kept, shape.answer_tokens, patch_dim=config.vision.patch_dim,
                         minor_frames=minor)
    _, frames = sb.synthetic_call(qa, device.dp, dp=device.dp)
    chunk = [jax.ShapeDtypeStruct((device.frame_chunk,) + a.shape[1:], a.dtype, sharding=device.rows)
             for a in frames.chunk(0, 0)]
    programs = [Program("stage-2 vision tower (one chunk of a call's frames; frozen, once per QA)",
                        lambda: device.lower_vision(*chunk, frames.merge), device.frame_chunk)]
    ladder = sb.token_ladder(shape.token_buckets) if shape.token_buckets else sb.TOKEN_BUCKETS
    for tokens in shape.token_buckets or (shape.tokens,):
        # the run's call shape for this bucket: (L, U = 2 L, A = the answer tokens' bucket for every call)
        kept, answers = max(1, min(shape.kept, tokens - shape.answer_tokens)), min(shape.answer_tokens, tokens // 2)
        sized = qa if tokens == shape.tokens else sb.synthetic_qa(layout, tokens, kept, answers,
                                                                  patch_dim=config.vision.patch_dim)
        call = sb.pack_call([sized] * device.dp, range(device.dp), frames.token_rows, row_weight=1.0 / device.dp,
                            min_answers=shape.answer_tokens, token_buckets=ladder)
        programs.append(_grad_program(setup, device, call, config))
    if events:
        programs.append(_scoring_program(setup, device, layout, shape.frames))
    return programs


def _scoring_program(setup, device, layout: VisualLayout, frames: int) -> Program:
    """The batched event scoring of one call whose every row is a stream of `frames` frames (`stage2_scoring`)."""
    from cogstream_jax.data.processor_config import load_tokenizer
    from cogstream_jax.inference.events import segment_count
    from cogstream_jax.model.generate import bucket_length
    from cogstream_jax.reference_files import bundled_model_dir
    from cogstream_jax.training.stage2_scoring import score_rows, scoring_arrays, scoring_length, synthetic_row

    model = setup.model(setup.state)
    tokenizer = load_tokenizer(bundled_model_dir())
    row = synthetic_row(frames, layout.num_tokens // frames, tokenizer, model.config.placeholder_ids)
    rows = device.dp
    arrays = _abstract(scoring_arrays({r: row for r in range(rows)}, rows, scoring_length(row.length)), device.rows)
    projected = jax.ShapeDtypeStruct((rows, bucket_length(layout.num_tokens), model.config.text.hidden_size),
                                     model.dtype, sharding=device.rows)
    graphdef, state = nnx.split(model)
    length = arrays["ids"].shape[1]
    return Program(f"stage-2 event scoring ({rows} QAs, {length} packed tokens, {row.num_segments} segments)",
                   lambda: score_rows.lower(graphdef, state, arrays, projected, segment_count(row.num_segments),
                                            device.rows, model.attn_mesh is not None), rows)


def _grad_program(setup, device, call, config: ModelConfig) -> Program:
    arrays = _abstract(call.arrays, device.rows)
    rows, inputs = call.sources.shape
    features = jax.ShapeDtypeStruct((rows, inputs, config.vision.hidden_size), device.dtype, sharding=device.rows)
    return Program(f"stage-2 gradient ({rows} QAs, bucket L={call.bucket[0]} U={call.bucket[1]} A={call.bucket[2]})",
                   lambda: device.lower_grad(setup.state, setup.frozen, arrays, features), rows, trains=True)


def eval_programs(config: ModelConfig, shape: JobShape, mesh: Mesh) -> list[Program]:
    from cogstream_jax.inference.segment_vision import encode_segment, padded_frames
    from cogstream_jax.inference.prefix_cache import MIN_CAPACITY
    from cogstream_jax.model.generate import DEFAULT_EOS, bucket_length, decode_loop, prefill, prefill_empty_cache
    from cogstream_jax.model.qwen2 import KVCache
    from cogstream_jax.model.sampling import SamplingConfig

    build = model_builder(config, shape)

    def model_with_adapters():
        model = build()
        lora.add_adapter(model, lora.LANGUAGE_MODULE, _lora_spec(lora.language_module_spec, config, shape))
        lora.add_adapter(model, lora.FULL_MODULE, _lora_spec(lora.full_module_spec, config, shape))
        lora.set_adapter(model, lora.FULL_MODULE)
        return model

    model = nnx.eval_shape(model_with_adapters)
    bind_attention(model, mesh)
    graphdef, state = nnx.split(model)
    state = with_shardings(state, state_shardings(state, mesh))
    rep = NamedSharding(mesh, PartitionSpec())
    sds = lambda shp, dt: jax.ShapeDtypeStruct(shp, dt, sharding=rep)  # noqa: E731
    layout = stage2_layout(config, shape)
    prompt = bucket_length(shape.tokens)
    rows = bucket_length(shape.kept)
    compute = jnp.dtype(shape.compute_dtype or shape.dtype)
    cache = jax.eval_shape(lambda: KVCache.init(config.text, 1, bucket_length(prompt + shape.max_new_tokens,
                                                                               MIN_CAPACITY), compute))
    cache = _abstract(cache, rep)
    vocab, sampling = config.text.vocab_size, SamplingConfig()
    key = sds((2,), jnp.uint32)
    ids = sds((1, prompt), jnp.int32)

    def lower_prefill(fill):
        return lambda: fill.lower(graphdef, state, ids, None, sds((rows, config.text.hidden_size), compute), None,
                                  ids, ids, sds((1, 1), jnp.int32), cache, sds((1, vocab), jnp.bool_), None, key,
                                  layout=None, num_kept=rows, sampling=sampling)

    def lower_decode():
        return decode_loop.lower(graphdef, state, cache, sds((1,), jnp.int32), sds((1,), jnp.int32),
                                 sds((1, vocab), jnp.bool_), None, key, sds((len(DEFAULT_EOS),), jnp.int32),
                                 sds((), jnp.int32), max_new_tokens=shape.max_new_tokens, sampling=sampling)

    frames = [sds(a.shape, a.dtype) for a in padded_frames(
        np.zeros((layout.num_patches, config.vision.patch_dim), np.float32), layout)]
    return [Program("segment vision encoding", lambda: encode_segment.lower(graphdef, state, *frames,
                                                                            merge=layout.merges[0]), 1),
            Program("answer prefill into an empty cache (largest prompt bucket; fused attention)",
                    lower_prefill(prefill_empty_cache), 1),
            Program("answer prefill after a kept prefix (largest prompt bucket; XLA attention over the cache)",
                    lower_prefill(prefill), 1),
            Program(f"answer decode loop ({shape.max_new_tokens} tokens)", lower_decode, 1, runs_a_loop=True)]


def has_loops(job: str, shape: JobShape, mesh: Mesh) -> bool:
    """Whether the job's programs run loops whose body XLA's cost analysis counts once: the training layer scan and
    stage 1's micro-batch accumulation (`global_batch_size` / micro-batch iterations of one step)."""
    if job not in SCANNED_JOBS:
        return False
    if shape.scan_layers:
        return True
    if job == "stage1":
        from cogstream_jax.training.stage1_geometry import batch_geometry

        return batch_geometry(shape, mesh)[1] > 1
    return False


BUILDERS = {"stage1": stage1_programs, "stage2": stage2_programs, "eval": eval_programs}
