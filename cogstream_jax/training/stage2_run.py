"""Stage 2 (video-text interleave reasoning) training run: one optimiser update per `--global_batch_qas` QAs (default
32 = the official 8 processes x 4 accumulated QAs), a checkpoint every 30 updates (official cadence).

Each device call takes `data x fsdp x --qas_per_device` different QAs (one row each, split over the data and fsdp
mesh axes) padded into a common bucket (`stage2_buckets`); `accumulation = global / rows` calls make an update,
whose gradient is the sum over its QAs of (mean answer-token CE) / global (the official DDP average of per-rank
`loss / 4` sums, up to a constant factor, see docs/fidelity.md). The frozen vision tower runs once per QA
(`stage2_device`): its output serves the question-aware event scoring (all rows of a call in one program,
`stage2_scoring`) and the gradient step. QAs are prepared (decode, resize, rewrite, DiffFP) by background threads,
`--prep_workers` at once, ahead of the device (`--prefetch_qas`); device metrics are fetched every `--logging_steps`
updates. Every process reads the same QA stream but prepares only the QAs of the rows its devices hold
(`stage2_calls.CallMaker`: small all-gathers settle each call's common shapes); the QA order and every random draw
depend on the stream position and the QA's place in its update only, so a run resumes on another mesh shape or
device count with the same QAs and masks. A QA over the largest bucket leaves its row empty (a warning names it). A
trailing group of fewer than `--global_batch_qas` QAs at the very end is dropped.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time
from typing import Callable, Iterator

import jax
import numpy as np
from flax import nnx

from cogstream_jax import compiled_store, lora
from cogstream_jax.data.dataset import QA_DIR, SEGMENTS_DIR, VQA_DIR, load_dataset
from cogstream_jax.data.pipelines import Stage2Config, stage2_dataset
from cogstream_jax.data.processor import Processor
from cogstream_jax.data.threads import OrderedMap, prep_workers
from cogstream_jax.errors import ConfigError
from cogstream_jax.io_utils import as_path, is_url
from cogstream_jax.sharding import make_mesh
from cogstream_jax.training import run_common
from cogstream_jax.training import stage2_buckets as sb
from cogstream_jax.training import stage2_token_buckets
from cogstream_jax.training.checkpoint import check_resume, checkpoint_dir, latest_meta
from cogstream_jax.training.loop import run_loop
from cogstream_jax.training.optim import stage2_optim
from cogstream_jax.training.setup import build_setup
from cogstream_jax.training.stage2_batches import event_compression_available
from cogstream_jax.training.stage2_calls import ANSWERS, DROPPED, PRESENT, TOKENS, CallMaker, collect
from cogstream_jax.training.stage2_device import Stage2Device
from cogstream_jax.training.step import StepOptions, add_grads_jit, data_parallel_size


def dataset_root(query_dir: str, video_dir: str):
    """The dataset root holding QA_Dataset/ and event_segments/; linked together in a temp folder if the two
    flags do not point at siblings with the standard names (URLs must be siblings: links cannot point there)."""
    query, video = as_path(query_dir), as_path(video_dir)
    for flag, path in (("--query_dir", query), ("--video_dir", video)):
        if not path.is_dir():
            raise ConfigError(f"{flag} {path}: folder not found")
    if query.name == QA_DIR and str(video) == str(query.parent / SEGMENTS_DIR):
        return query.parent
    if is_url(query) or is_url(video):
        raise ConfigError(f"--query_dir {query} and --video_dir {video}: on an object store they must be the "
                          f"{QA_DIR}/ and {SEGMENTS_DIR}/ folders of one dataset folder")
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


def needs_scoring(qa: sb.PreparedQA, events: bool) -> bool:
    if not events or qa.layout is None:
        return False
    from cogstream_jax.inference.events import should_compress

    return should_compress(qa.num_frames)


def prepare_item(sample, processor, events: bool):
    """A sample's host preparation: a FinalQA, a PreparedQA still to be event-scored, or the OversizedQA error."""
    try:
        qa = sb.prepare_qa(sample, processor)
        if not needs_scoring(qa, events):
            return sb.finalize_qa(qa)
        if len(qa.ids) > sb.TOKEN_BUCKETS[-1]:  # DiffFP alone bounds the length (minor frames only drop more)
            sb.finalize_qa(qa)
        return qa
    except sb.OversizedQA as e:
        return e


class QAStream:
    """The stage-2 QA stream with host preparation on `workers` background threads, up to `depth` QAs ahead.

    Yields (position, item) for every stream position: a PreparedQA or FinalQA where `owns(i)` for the i-th position
    since the stream (re)started (the rows of this process's devices: the stream starts and resumes at the first
    row of a device call), None elsewhere (not prepared here), or the `OversizedQA` of a QA over the largest
    bucket, which is skipped with a warning naming it (its row stays empty, so positions never shift between
    processes or meshes). Several workers prepare different QAs at once (a QA's decoding also uses the processor's
    threads): the items and their order do not depend on the worker count. Checkpointable like a grain iterator
    (`get_state` / `set_state`): the state is the number of stream positions consumed, the same on any mesh."""

    def __init__(self, make_iterator, processor, *, depth: int, events: bool,
                 owns: Callable[[int], bool] = lambda position: True, workers: int = 1, warn: bool = True):
        self.make_iterator, self.processor, self.depth, self.events = make_iterator, processor, depth, events
        self.owns, self.workers, self.warn = owns, workers, warn
        self.consumed = 0  # stream positions consumed (the checkpoint state)
        self.read = self.own = 0  # positions read by this process, and those of them prepared here
        self.dropped: list[str] = []
        self._items = None
        self._start(0)

    def _prepare(self, entry):
        position, sample = entry
        if not self.owns(position - self._origin):
            return None
        try:
            return prepare_item(sample, self.processor, self.events)
        except Exception as e:  # noqa: BLE001 - raised by the consumer, in its place in the stream
            return e
        except BaseException as e:  # (SystemExit from a library, say) an error of this QA, shared like any other
            return RuntimeError(f"stage-2 QA preparation stopped: {e!r}")

    def _start(self, skip: int):
        self.close()
        self._origin = skip  # a (re)start is at a device call's first row: ownership counts from here
        iterator = iter(self.make_iterator())
        for _ in range(skip):
            next(iterator)
        self._items = OrderedMap(self._prepare, enumerate(iterator, start=skip), workers=self.workers,
                                 ahead=self.depth)

    def __next__(self):
        item = next(self._items)
        position = self.consumed
        self.consumed += 1
        self.read += 1
        self.own += item is not None
        if isinstance(item, sb.OversizedQA):
            if self.warn:
                print(f"warning: dropped stage-2 QA at stream position {position}: {item}", file=sys.stderr)
            self.dropped.append(str(item))
        elif isinstance(item, Exception):
            raise item
        return position, item

    def __iter__(self):
        return self

    def get_state(self) -> bytes:
        return json.dumps({"consumed": self.consumed}).encode()

    def set_state(self, state: bytes) -> None:
        self.consumed = int(json.loads(state.decode())["consumed"])
        self._start(self.consumed)

    def start_prefetch(self) -> None:  # grain's restore hook
        pass

    def close(self, wait: bool = False) -> None:
        """Stop preparing; `wait`: until the QAs being prepared have finished."""
        if self._items is not None:
            self._items.close(wait)


#: stage-2 settings a resumed run may change on top of `run_common.RESUMABLE_CHANGES`: how the global batch is
#: cut into device calls and how the host feeds them (the QA order and every draw stay the same)
RESUMABLE_CHANGES = frozenset({"qas_per_device", "qas_per_call", "prefetch_qas", "prep_workers",
                               "logging_steps", "frame_cache_clips", "token_buckets", "token_bucket_count",
                               "bucket_scan_qas", "token_ladder", "precompiled_token_buckets", "answer_positions"})


def check_global_batch(global_qas: int, rows: int, dp: int, per_device: int) -> int:
    """Calls per update (`accumulation`); a global batch the rows per call cannot make is refused."""
    if global_qas < 1 or per_device < 1:
        raise ConfigError(f"--global_batch_qas ({global_qas}) and --qas_per_device ({per_device}) must be >= 1")
    if global_qas % rows:
        raise ConfigError(f"--global_batch_qas {global_qas} is not a multiple of the QAs per device call = data x "
                          f"fsdp ({dp}) x --qas_per_device ({per_device}) = {rows}; use a multiple of {rows} "
                          "or change --mesh / --qas_per_device")
    return global_qas // rows


def run(args: argparse.Namespace) -> int:
    run_common.start(args)
    if args.num_epochs < 1:
        raise ConfigError(f"--num_epochs must be >= 1, got {args.num_epochs}")
    if args.logging_steps < 1:
        raise ConfigError(f"--logging_steps must be >= 1, got {args.logging_steps}")
    mesh = make_mesh(args.mesh)
    dp = data_parallel_size(mesh)
    rows = dp * args.qas_per_device
    accumulation = check_global_batch(args.global_batch_qas, rows, dp, args.qas_per_device)
    workers = prep_workers(args.prep_workers)
    plan = stage2_token_buckets.parse(args.token_buckets, args.token_bucket_count, args.bucket_scan_qas)
    if args.compiled_dir and plan is not None and not plan.chosen:
        raise ConfigError(f"--compiled_dir serves the gradient programs a run compiles before its first update: "
                          f"--token_buckets auto or a list, not {args.token_buckets}")
    check_resume(checkpoint_dir(args.output_dir), args.resume)  # before loading and scanning, not after
    buckets = (args.token_buckets, args.token_bucket_count, args.bucket_scan_qas)
    saved = stage2_token_buckets.saved_plan(latest_meta(args.output_dir) if args.resume else None, *buckets)
    dataset = load_dataset(dataset_root(args.query_dir, args.video_dir))
    data_config = Stage2Config(seed=args.seed, num_epochs=args.num_epochs, fps=args.fps, max_frames=args.max_frames)
    total_qas = count_qas(dataset, data_config)
    if total_qas < args.global_batch_qas:
        raise ConfigError(f"{args.query_dir}: {total_qas} QAs over all epochs do not fill one update of "
                          f"--global_batch_qas {args.global_batch_qas}: nothing would be trained")
    total_steps = total_qas // args.global_batch_qas
    model, tokenizer_dir = run_common.load_model(args, mesh)
    processor = Processor.from_pretrained(tokenizer_dir, cache_frames=args.frame_cache_clips,
                                          threads=args.decode_threads)
    quantized = run_common.quantize_base(model, args.base_quant)
    events = args.event_compression and event_compression_available()
    if args.event_compression and not events:
        print("note: event compression (cogstream_jax.inference.events) is not available in this build; "
              "stage 2 trains with DiffFP only", file=sys.stderr)
    # (event compression only acts on streams above 135 frames, inference.events.should_compress)
    spec = lora.LoraSpec(args.lora_r, args.lora_alpha, args.lora_dropout,
                         lora.full_module_spec(model.config).target_modules)
    optim = stage2_optim(args.num_epochs, len(dataset.videos), run_common.given(args.learning_rate, 1e-4),
                         global_batch_qas=args.global_batch_qas)
    setup = build_setup(model, lora.FULL_MODULE, spec, optim, mesh, seed=args.seed,
                        options=StepOptions(remat=args.remat, dropout_rng=args.dropout_rng,
                                            scan_layers=not args.no_scan_layers))
    log, own_log = _compile_log()  # before the bucket scan: its vision and scoring programs are the run's
    started = time.perf_counter()
    try:
        device = Stage2Device(setup)
        # before the scan: a folder this run cannot use fails now, not minutes later
        executables = (compiled_store.load(args.compiled_dir, device.grad_name, mesh) if args.compiled_dir
                       else None)
        maker = CallMaker(setup, device, processor.tokenizer, rows=rows, seed=args.seed)
        # --prefetch_qas counts this process's QAs; the positions of other processes' rows pass through unprepared
        depth = args.prefetch_qas * rows // max(int(maker.own.sum()), 1)
        plan = stage2_token_buckets.resolve(
            plan, args.token_bucket_count, args.bucket_scan_qas, lambda: stage2_dataset(dataset, data_config),
            _bucket_measure(maker, processor, setup, events, workers=workers, depth=depth), saved)
    except BaseException:
        if own_log:
            log.__exit__(None, None, None)
        raise
    config = run_common.resolved_config(args, stage=2, videos=len(dataset.videos), qas=total_qas,
                                        learning_rate=optim.learning_rate, accumulation_steps=accumulation,
                                        qas_per_call=rows, total_steps=total_steps, t_max=optim.total_steps,
                                        event_compression_active=events, quantized_kernels=quantized,
                                        mesh_shape=dict(mesh.shape), token_ladder=list(plan.ladder),
                                        precompiled_token_buckets=list(plan.chosen), answer_positions=plan.answers)
    run_common.announce_config(args.output_dir, config)

    apply_fn = setup.apply()
    # the towers' own weights: with the adapters' LoRA-shaped arrays too, the optimiser update would count
    tower_weights = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    towers = (nnx.state(model.vision_encoder, tower_weights), nnx.state(model.language_model, tower_weights))
    stream = QAStream(lambda: stage2_dataset(dataset, data_config), processor, events=events, owns=maker.owns,
                      depth=depth, workers=workers)
    limit = min(total_steps, args.max_steps) if args.max_steps is not None else total_steps
    stats = {"real": 0, "padded": 0, "dropped": 0, "host_wait": 0.0, "started": started, "pending": [], "step": None}

    def update(state, it):
        if stats["step"] is None:
            stats["step"] = int(jax.device_get(state.step))
        grads, losses, present, tokens = None, [], [], 0
        for call_index in range(accumulation):
            waited = time.perf_counter()
            items, failed = collect(lambda: next(it)[1], rows)
            stats["host_wait"] += time.perf_counter() - waited
            finals, frames, flat, dropped = maker.finals(state, items, failed)
            table = maker.table(finals, dropped)
            places = range(call_index * rows, (call_index + 1) * rows)  # the QAs' places in the update
            call, arrays, inputs = maker.pack(finals, frames, flat, table, places,
                                              row_weight=1.0 / args.global_batch_qas, token_buckets=plan.ladder,
                                              answers=plan.answers)
            g, loss, _ = device.grad(state, setup.frozen, arrays, inputs)
            grads = g if grads is None else add_grads_jit(grads, g)
            losses.append(loss)
            present.append(table[:, PRESENT].astype(bool))
            tokens += int(table[:, ANSWERS].sum())
            stats["real"] += int(table[:, TOKENS].sum())
            stats["padded"] += call.bucket[0] * int(table[:, PRESENT].sum())
            stats["dropped"] += int(table[:, DROPPED].sum())
        state, metrics = apply_fn(state, grads)
        stats["step"] += 1
        stats["pending"].append((losses, np.concatenate(present), metrics))
        out = {"tokens": float(tokens), "qas": float(args.global_batch_qas)}
        if stats["step"] % args.logging_steps == 0 or stats["step"] >= limit:
            pending = jax.device_get(stats["pending"])  # one device->host transfer per logging interval
            stats["pending"] = []
            # per update the mean loss of its QAs trained (an empty row's, a dropped QA's, is not one), then the
            # mean over the interval's updates that trained any
            trained = [np.concatenate(ls)[mask].mean() for ls, mask, _ in pending if mask.any()]
            out.update(loss=float(np.mean(trained)) if trained else float("nan"),
                       **{k: float(v) for k, v in pending[-1][2].items()})
            elapsed = time.perf_counter() - stats["started"]
            built = log.model_sized(*towers)
            read = [p for p in built if p.from_cache]  # from the persistent compilation cache
            compiled = [p for p in built if not p.from_cache]
            # the gradient programs (one per token bucket) apart: the frozen vision chunk and event scoring
            # compile once each, whatever the QAs' lengths
            out.update(model_programs_compiled=float(len(compiled)),
                       gradient_programs_compiled=float(sum(p.name == device.grad_name for p in compiled)),
                       model_programs_read_back=float(len(read)),
                       gradient_programs_read_back=float(sum(p.name == device.grad_name for p in read)),
                       compile_seconds=float(log.compile_seconds),
                       compile_share=float(log.compile_seconds / elapsed) if elapsed > 0 else 0.0,
                       padding_overhead=float(stats["padded"] / max(stats["real"], 1) - 1.0),
                       host_wait_share=float(stats["host_wait"] / elapsed) if elapsed > 0 else 0.0,
                       dropped_qas=float(stats["dropped"]))
        return state, out

    try:
        # every planned gradient program before the first update (the stream already prepares QAs meanwhile)
        compiling = time.perf_counter()
        compiled, taken, read_back = device.precompile(setup.state, setup.frozen, maker.empty_calls(
            plan.chosen, token_buckets=plan.ladder, answers=plan.answers), saved=executables)
        ahead = compiled_store.ahead_text(taken, None if executables is None else len(executables), read_back)
        executables = None  # those not taken leave the devices
        if plan.chosen:
            print(f"stage 2: {len(plan.chosen)} gradient programs (token buckets {list(plan.chosen)}, "
                  f"{plan.answers} answer positions): {ahead}{compiled} compiled in "
                  f"{time.perf_counter() - compiling:.1f} s", file=sys.stderr)
        result = run_loop(setup, update, stream, output_dir=args.output_dir, total_steps=total_steps,
                          resume=args.resume, max_steps=args.max_steps,
                          save_steps=run_common.given(args.save_steps, 30), keep_last=args.keep_last,
                          meta={"stage": 2, "run": run_common.run_fingerprint(
                              {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}),
                                "token_buckets": stage2_token_buckets.checkpoint_record(*buckets, plan)},
                          show_progress=not args.no_progress, desc="stage2")
    finally:
        stream.close()
        if own_log:
            log.__exit__(None, None, None)
    print(f"stage 2, process {jax.process_index()}: prepared {stream.own} of the {stream.read} QAs read (the rows "
          "of its devices)", file=sys.stderr)
    if result.exit_code == 0:
        run_common.export_adapter(setup.model(), lora.FULL_MODULE, args.output_dir)
    return result.exit_code


def _bucket_measure(maker: CallMaker, processor, setup, events: bool, *, workers: int, depth: int):
    """`--token_buckets auto`'s measure: the scan's QAs -> each one's tokens as a call of the run would make them
    (event compression scored with the starting adapter), its tokens without event compression (the most it can
    take later) and its answer tokens, or None for an over-large QA; one call's worth at a time. Each process
    prepares its own rows (on `workers` threads, `depth` QAs ahead, as the run's stream does); all get every row's."""
    def measure(samples: list) -> Iterator[tuple[int, int, int] | None]:
        stream = QAStream(lambda: samples, processor, depth=depth, events=events, owns=maker.owns, workers=workers,
                          warn=False)
        try:
            for start in range(0, len(samples), maker.rows):
                count = min(maker.rows, len(samples) - start)
                items, failed = collect(lambda: next(stream)[1], count)
                yield from _measure_call(maker, setup, items, failed, count)
        finally:
            stream.close()

    return measure


def _measure_call(maker: CallMaker, setup, items: list, failed: Exception | None, count: int
                  ) -> list[tuple[int, int, int] | None]:
    finals, _, _, dropped = maker.finals(setup.state, items, failed)
    most = np.zeros(maker.rows, np.int64)
    for r, (item, final) in enumerate(zip(items, finals)):
        if final is None:
            continue
        most[r] = final.num_tokens
        if isinstance(item, sb.PreparedQA):
            try:
                most[r] = sb.finalize_qa(item).num_tokens
            except sb.OversizedQA:  # only event compression fits it: no bound below the largest bucket
                pass
    table = maker.table(finals, dropped, extra=most)
    return [(int(row[TOKENS]), int(row[-1]), int(row[ANSWERS])) if row[PRESENT] else None for row in table[:count]]


def _compile_log():
    """The active CompileLog (a caller's, e.g. a test's) or a new one for this run: (log, whether it is ours)."""
    from cogstream_jax.compile_log import CompileLog

    if CompileLog._active is not None:
        return CompileLog._active, False
    return CompileLog().__enter__(), True
