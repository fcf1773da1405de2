"""Streaming QA evaluation (the official evaluate/answer_generate.py, protocol 2), in JAX.

    python -m evaluate.answer_generate --model_path DIR|tiny --retrieval_adapter DIR --answer_adapter DIR \
        --video_dir Test_dataset/event_segments --query_dir Test_dataset/QA_Dataset --save_dir results \
        [--mode FCC|AC|NC|gt] [--chains first|all] [--limit N] [--greedy] [--max_new_tokens 1024]

Writes `{save_dir}/{video}.json` per video (official format), atomically; a rerun skips finished videos;
the videos are split without duplicates over the processes of a multi-process JAX runtime (formed as in training:
`JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`, or a cluster JAX detects), or over independent
workers named by `--num_processes/--process_index`; inside a process, each group of `--devices_per_stream` local
devices evaluates one stream at a time (inference/parallel.py). The official `--lora_adapter_1_path` /
`--lora_adapter_2_path` are accepted: each adapter's role is read from its content (the answer adapter targets
the projector), because the official script loads them swapped (protocol 7 #3). Every folder (model, adapters,
videos, queries, results) may be an object-store URL (gs://bucket/...); results are then written there.
"""
from __future__ import annotations

import argparse
import sys

from cogstream_jax import persistent_cache
from cogstream_jax.cli_utils import add_flag as _add
from cogstream_jax.cli_utils import run_cli
from cogstream_jax.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluate.answer_generate", description=__doc__.split("\n\n")[0])
    _add(parser, "model_path", required=True, help="checkpoint folder, or 'tiny' (random tiny model, real tokenizer)")
    _add(parser, "retrieval_adapter", default=None, help="retrieval (stage 1, language_module) adapter folder")
    _add(parser, "answer_adapter", default=None, help="answer (stage 2, full_module) adapter folder")
    _add(parser, "lora_adapter_1_path", default=None, help="official flag; role detected from content")
    _add(parser, "lora_adapter_2_path", default=None, help="official flag; role detected from content")
    # folders stay strings here (made paths in _run): a URL such as gs://bucket/run must not become gs:/bucket/run,
    # and a malformed one is a one-line error there, not a traceback from an argparse type hook
    _add(parser, "video_dir", required=True, help="event_segments folder ({video}/{video}_segment_n.mp4), or a URL")
    _add(parser, "query_dir", required=True, help="QA_Dataset folder ({video}.json), or a URL")
    _add(parser, "save_dir", required=True, help="where {video}.json results go (a folder or a gs:// URL)")
    _add(parser, "mode", default="FCC", choices=["FCC", "AC", "NC", "gt"], help="history selection mode (FCC)")
    _add(parser, "chains", default="first", choices=["first", "all"], help="evaluate chain 0 (official) or all")
    _add(parser, "limit", default=None, type=int, help="evaluate at most N videos (after the process split)")
    _add(parser, "max_questions", default=None, type=int, help="at most N questions per chain (quick runs)")
    _add(parser, "greedy", action="store_true", help="greedy answers (the repetition penalty still applies)")
    _add(parser, "max_new_tokens", default=1024, type=int, help="answer length cap (official 1024)")
    _add(parser, "resize", default="faithful", choices=["faithful", "fixed"],
         help="faithful: official shared budget, re-encode per question; fixed: encode each segment once")
    _add(parser, "max_stream_frames", default=180, type=int, help="frames the fixed resolution is sized for")
    _add(parser, "no_reuse_prefix", action="store_true",
         help="prefill every prompt whole (official) instead of reusing the previous question's KV prefix")
    _add(parser, "embed_with", default="full_module", choices=["full_module", "answer", "retrieval", "base"],
         help="weights that embed events and the question for event compression")
    _add(parser, "seed", default=42, type=int, help="base seed; each (video, question) derives its own key")
    _add(parser, "dtype", default=None, choices=["float32", "bfloat16"],
         help="parameter dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
    _add(parser, "decode_threads", default=None, type=int,
         help="host threads decoding and resizing video per worker (default: usable cores, at most 8)")
    _add(parser, "num_processes", default=None, type=int,
         help="independent workers sharing the videos (default: the JAX runtime's process count, usually 1)")
    _add(parser, "process_index", default=None, type=int,
         help="this worker's index (default: the JAX runtime's process index)")
    _add(parser, "streams", default="auto", type=_auto_or_int,
         help="streams evaluated at once in this process, one per device group (auto: every group on GPU/TPU, "
              "1 on CPU, whose devices share the cores)")
    _add(parser, "devices_per_stream", default="auto", type=_auto_or_int,
         help="local devices holding one copy of the model, fsdp-sharded when > 1 (auto: the fewest whose memory "
              "holds the weights)")
    _add(parser, "no_progress", action="store_true", help="no progress bar")
    persistent_cache.add_compilation_cache_flag(parser)
    return parser


def _auto_or_int(text: str) -> str | int:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(persistent_cache.wrap(args.compilation_cache_dir, lambda: _run(args)))


def _run(args: argparse.Namespace) -> int:
    from cogstream_jax.inference.adapters import assign_official_adapters
    from cogstream_jax.inference.evaluation import check_settings, find_jobs, run_evaluation, shard
    from cogstream_jax.inference.parallel import replicate_session
    from cogstream_jax.inference.session import StreamingSession
    from cogstream_jax.io_utils import as_path

    video_dir, query_dir, save_dir = as_path(args.video_dir), as_path(args.query_dir), as_path(args.save_dir)
    retrieval_dir, answer_dir = args.retrieval_adapter, args.answer_adapter
    if args.lora_adapter_1_path or args.lora_adapter_2_path:
        if retrieval_dir or answer_dir:
            raise UserError("give either --retrieval_adapter/--answer_adapter or the official "
                            "--lora_adapter_1_path/--lora_adapter_2_path, not both")
        retrieval_dir, answer_dir = assign_official_adapters(args.lora_adapter_1_path, args.lora_adapter_2_path)
    if args.limit is not None and args.limit < 0:
        raise UserError(f"--limit must be >= 0, got {args.limit}")
    if args.max_questions is not None and args.max_questions < 1:
        raise UserError(f"--max_questions must be >= 1, got {args.max_questions}")
    from cogstream_jax.training.distributed import DistributedConfig, maybe_initialize

    maybe_initialize(DistributedConfig.from_env())
    index, count = worker_split(args.process_index, args.num_processes)
    if args.dtype is None:
        import jax

        args.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    jobs = shard(find_jobs(video_dir, query_dir, warn=lambda m: print(m, file=sys.stderr)), index, count)
    jobs = jobs[: args.limit] if args.limit is not None else jobs
    # what changes the result files (not: paths of the data, worker split, threads, prefix reuse, --limit)
    settings = {
        "model_path": _where(args.model_path), "retrieval_adapter": _where(retrieval_dir),
        "answer_adapter": _where(answer_dir),
        "mode": args.mode, "chains": args.chains, "max_questions": args.max_questions, "greedy": args.greedy,
        "max_new_tokens": args.max_new_tokens, "resize": args.resize, "max_stream_frames": args.max_stream_frames,
        "embed_with": args.embed_with, "seed": args.seed, "dtype": args.dtype}
    check_settings(save_dir, settings)  # before loading any weights
    groups = stream_groups(args.model_path, args.dtype, args.streams, args.devices_per_stream, len(jobs))
    session = StreamingSession.from_pretrained(
        args.model_path, retrieval_adapter=retrieval_dir, answer_adapter=answer_dir, resize=args.resize,
        max_stream_frames=args.max_stream_frames, dtype=args.dtype, greedy=args.greedy,
        decode_threads=args.decode_threads, mode=args.mode,
        max_new_tokens=args.max_new_tokens, embed_with=args.embed_with, seed=args.seed,
        reuse_prefix=not args.no_reuse_prefix, devices=groups[0] if groups else None)
    sessions = [session] + [replicate_session(session, g) for g in (groups or [])[1:]]
    stats = run_evaluation(sessions, jobs, save_dir, chains=args.chains, max_questions=args.max_questions,
                           progress=not args.no_progress, settings=settings, groups=groups)
    wait_for_all_processes("eval")
    print(f"done: {stats['videos']} videos ({stats['skipped']} already finished), {stats['questions']} questions, "
          f"{stats['errors']} errors -> {args.save_dir}", file=sys.stderr)
    return 0


def stream_groups(model_path: str, dtype: str, streams: str | int, per_stream: str | int, n_jobs: int):
    """The device groups that evaluate this process's videos at once, one model copy and stream each (see
    inference/parallel.py), decided from the model's config before any weight is read; None: one stream on the
    default device."""
    import jax

    from cogstream_jax.inference.loading import weight_bytes
    from cogstream_jax.inference.parallel import device_groups, device_memory, devices_per_stream, stream_count

    devices = jax.local_devices()
    k = devices_per_stream(per_stream, len(devices), weight_bytes(model_path, dtype), device_memory(devices[0]))
    n = stream_count(streams, len(devices) // k, devices[0].platform)
    groups = device_groups(devices, k, max(1, min(n, n_jobs)))
    if len(groups) == 1 and k == 1:
        return None
    print(f"eval: {len(groups)} stream(s) at once, {k} device(s) each", file=sys.stderr)
    return groups


def worker_split(process_index: int | None, num_processes: int | None) -> tuple[int, int]:
    """(index, count) of this worker among those sharing the videos: the JAX runtime's processes when it has
    several (explicit flags must then agree with it), else `--process_index/--num_processes` (default 0 of 1)."""
    import jax

    if jax.process_count() > 1:
        runtime = (jax.process_index(), jax.process_count())
        given = (process_index if process_index is not None else runtime[0],
                 num_processes if num_processes is not None else runtime[1])
        if given != runtime:
            raise UserError(f"--process_index/--num_processes {given[0]}/{given[1]} disagree with the JAX runtime "
                            f"(process {runtime[0]} of {runtime[1]}); leave them out, the runtime splits the videos")
        return runtime
    return (0 if process_index is None else process_index), (1 if num_processes is None else num_processes)


def wait_for_all_processes(tag: str, poll_s: int = 60) -> None:
    """In a multi-process runtime, wait (without a deadline) until every process has finished its videos: JAX's
    exit barrier gives up after 5 minutes, and hosts with more or longer videos may take hours longer."""
    import jax

    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    client.key_value_set(f"cogstream/{tag}/done/{jax.process_index()}", "1")
    for other in range(jax.process_count()):
        while True:
            try:
                client.blocking_key_value_get(f"cogstream/{tag}/done/{other}", poll_s * 1000)
                break
            except Exception as exc:  # a timeout: keep waiting (heartbeats still catch a dead peer)
                if "DEADLINE" not in str(exc).upper() and "TIMED OUT" not in str(exc).upper():
                    raise


def _where(path: str | None) -> str | None:
    """Absolute folder paths, so a rerun from another working directory compares equal."""
    from cogstream_jax.io_utils import as_path

    return path if path in (None, "tiny") else str(as_path(path))


if __name__ == "__main__":
    sys.exit(main())
