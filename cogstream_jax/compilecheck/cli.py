"""`cogstream compile-check`: will this job fit the slice (or GPU host) before anyone rents it?

Compiles the job's own jitted programs for compile-only devices of the named topology (libtpu / the CUDA
plugin describe them on any host; JAX itself runs on the CPU) and prints, per program, the bytes each device
needs, the share of its HBM, the FLOPs per device and the compile time. `--json` adds one JSON line last.
Exit 0: everything fits; 3: a program does not (named); 2: bad input.

    cogstream compile-check --topology v5p-8 --job stage2 --model_path videollama3_7b [--mesh 1,4,1] [--json]
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only devices come from the topology, never a backend

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Sequence  # noqa: E402

from cogstream_jax import compiled_store  # noqa: E402
from cogstream_jax.cli_utils import ArgumentParser, forward, run_cli  # noqa: E402
from cogstream_jax.errors import ConfigError  # noqa: E402

EXIT_DOES_NOT_FIT = 3
#: above this share of HBM a program "fits" by XLA's count with little room for the allocator's fragmentation
TIGHT_SHARE = 0.9


def build_parser() -> argparse.ArgumentParser:
    from cogstream_jax.compilecheck.hardware import TARGETS
    from cogstream_jax.compilecheck.jobs import JOBS, JobShape
    from cogstream_jax.model.qwen2 import REMAT_CHOICES
    from cogstream_jax.training.run_common import DEFAULT_MESH

    d = JobShape()
    p = ArgumentParser(prog="cogstream compile-check", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", required=True, help=f"accelerator type: {', '.join(TARGETS)}")
    p.add_argument("--job", required=True, help=f"one of {', '.join(JOBS)}")
    p.add_argument("--model_path", required=True,
                   help="a preset (videollama3_7b, tiny, bench) or a checkpoint folder or gs:// URL (only config.json "
                        "is read)")
    p.add_argument("--mesh", default=DEFAULT_MESH, help="data,fsdp,tensor over the target's devices (default: the "
                                                        f"training jobs' {DEFAULT_MESH}, FSDP over all devices)")
    p.add_argument("--json", action="store_true", help="one JSON line last")
    p.add_argument("--save_compiled", default=None, help="folder (or gs:// URL) for the serialised executables")
    p.add_argument("--no_flop_count", action="store_true",
                   help="skip the extra compiles that count the FLOPs of loops (layer scan, micro-batches, TPU "
                        "windowed einsums) and report XLA's own count, loop bodies once (e.g. when only saving)")
    g = p.add_argument_group("the job's own flags")
    g.add_argument("--dtype", default=d.dtype, choices=["bfloat16", "float32"])
    g.add_argument("--compute_dtype", default=None, choices=["bfloat16", "float32"])
    g.add_argument("--remat", default=None, help=f"training jobs: {', '.join(REMAT_CHOICES)} (default: the job's)")
    g.add_argument("--no_scan_layers", action="store_true",
                   help="trace every decoder layer separately instead of one scan (slower to compile)")
    g.add_argument("--attn_impl", default="auto",
                   help="auto (splash on TPU, cuDNN on GPU for bf16), xla, dense, chunked, splash or cudnn")
    g.add_argument("--lora_r", type=int, default=d.lora_r)
    g.add_argument("--global_batch_size", type=int, default=d.global_batch_size, help="stage 1: items per update")
    g.add_argument("--micro_batch_size", type=int, default=None, help="stage 1: items per micro-batch")
    g.add_argument("--max_length", type=int, default=d.max_length, help="stage 1: tokens per row")
    g.add_argument("--length_buckets", default=None,
                   help="stage 1: one gradient program per padded row length the run can meet: all (with "
                        "--save_compiled, so a run compiles none) or some of them, e.g. 1024,2048; default: the "
                        "longest, --max_length rounded up to 128")
    g.add_argument("--frames", type=int, default=d.frames, help="stage 2 / eval: frames of the largest QA")
    g.add_argument("--grid", default="x".join(map(str, d.grid)), help="patch grid per frame, HxW")
    g.add_argument("--kept", type=int, default=d.kept, help="visual tokens kept after DiffFP")
    g.add_argument("--tokens", type=int, default=d.tokens, help="stage 2: tokens of the QA; eval: prompt tokens")
    g.add_argument("--answer_tokens", type=int, default=d.answer_tokens)
    g.add_argument("--token_buckets", default=None,
                   help="stage 2: one gradient program per token bucket, e.g. a run's train_config.json "
                        "precompiled_token_buckets (256,640,1920); default: the bucket of --tokens")
    g.add_argument("--event_compression", default=True, action=argparse.BooleanOptionalAction)
    g.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens, help="eval: answer length cap")
    return p


def model_config(path: str):
    """A preset's config, or config.json of a checkpoint folder (a gs:// URL is read there, never as a local
    `gs:/bucket` folder)."""
    from cogstream_jax.config import PRESETS, ModelConfig
    from cogstream_jax.io_utils import as_path

    if path in PRESETS:
        return PRESETS[path]()
    folder = as_path(path)
    if not folder.is_dir():
        raise ConfigError(f"--model_path {path}: neither a preset ({', '.join(PRESETS)}) nor a folder")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--model_path {path}: no config.json in the folder")
    return ModelConfig.from_hf_config(path)


def job_shape(args: argparse.Namespace):
    from cogstream_jax.compilecheck.jobs import JobShape
    from cogstream_jax.model.qwen2 import REMAT_CHOICES

    try:
        grid = tuple(int(x) for x in args.grid.lower().split("x"))
        if len(grid) != 2:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--grid {args.grid!r}: expected HxW, e.g. 14x26") from None
    for flag in ("lora_r", "global_batch_size", "max_length", "frames", "kept", "tokens", "answer_tokens",
                 "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.remat is not None and args.remat not in REMAT_CHOICES:
        raise ConfigError(f"--remat {args.remat!r}: choose {', '.join(REMAT_CHOICES)}")
    if args.length_buckets is not None and args.job != "stage1":
        raise ConfigError(f"--length_buckets is for --job stage1 (padded row lengths), not --job {args.job}")
    buckets = ()
    if args.token_buckets is not None:
        from cogstream_jax.training.stage2_token_buckets import parse

        plan = parse(args.token_buckets, 1, 1)
        if plan is None or not plan.chosen:
            raise ConfigError(f"--token_buckets {args.token_buckets!r}: expected token counts like '256,640,1920' "
                              "(a run's precompiled_token_buckets)")
        buckets = plan.chosen
    return JobShape(dtype=args.dtype, compute_dtype=args.compute_dtype, attn_impl=args.attn_impl, remat=args.remat,
                    scan_layers=not args.no_scan_layers, lora_r=args.lora_r,
                    global_batch_size=args.global_batch_size, micro_batch_size=args.micro_batch_size,
                    max_length=args.max_length, length_buckets=stage1_lengths(args.length_buckets, args.max_length),
                    frames=args.frames, grid=grid, kept=args.kept, tokens=args.tokens,
                    answer_tokens=args.answer_tokens, token_buckets=buckets,
                    event_compression=args.event_compression, max_new_tokens=args.max_new_tokens)


def stage1_lengths(text: str | None, max_length: int) -> tuple[int, ...]:
    """--length_buckets: "all" of a stage-1 run's padded lengths (`stage1_geometry.length_buckets`), or some."""
    if text is None:
        return ()
    from cogstream_jax.training.stage1_geometry import length_buckets

    run = length_buckets(max_length)
    if text.strip() == "all":
        return run
    try:
        chosen = tuple(sorted({int(x) for x in text.split(",")}))
    except ValueError:
        chosen = ()
    if not chosen or not set(chosen) <= set(run):
        raise ConfigError(f"--length_buckets {text!r}: 'all' or some of a --max_length {max_length} run's padded "
                          f"lengths {','.join(map(str, run))}")
    return chosen


def check_cudnn_library(topology: str) -> None:
    """Tracing cuDNN attention asks the cuDNN library for its version; a GPU host has it (jax[cuda12] installs it),
    a CPU host compiling for a GPU needs the wheel too."""
    from jax._src.lib import cuda_versions

    try:
        available = cuda_versions is not None and cuda_versions.cudnn_get_version() > 0
    except RuntimeError:
        available = False
    if not available:
        raise ConfigError(f"--topology {topology}: cuDNN attention cannot be compiled here: the cuDNN library is not "
                          "installed (pip install --no-deps 'nvidia-cudnn-cu12>=9.8,<10'; nvidia-cudnn-cu13 beside "
                          "a CUDA 13 plugin), or pass --attn_impl xla")


def run(args: argparse.Namespace) -> int:
    from cogstream_jax.compilecheck import hardware, jobs, report
    from cogstream_jax.compilecheck.devices import compile_only_devices
    from cogstream_jax.model.attention import resolve_attn_impl
    from cogstream_jax.sharding import make_mesh

    target = hardware.target(args.topology)
    if args.save_compiled:
        from cogstream_jax.io_utils import as_path

        as_path(args.save_compiled)  # a malformed URL is an error now, not after minutes of compiling
    if args.job not in jobs.JOBS:
        raise ConfigError(f"--job {args.job!r}: choose one of {', '.join(jobs.JOBS)}")
    config = model_config(args.model_path)
    shape = job_shape(args)
    mesh = make_mesh(args.mesh, compile_only_devices(target))
    mesh_shape = {k: int(v) for k, v in mesh.shape.items()}
    attention = resolve_attn_impl(shape.attn_impl, target.platform, shape.compute_dtype or shape.dtype)
    if attention == "cudnn":
        check_cudnn_library(args.topology)
    print(f"{args.job} on {target.name}: {target.devices} devices ({target.generation.device_is}), "
          f"mesh {mesh_shape}, attention {attention}", file=sys.stderr)
    start = time.perf_counter()
    programs = jobs.BUILDERS[args.job](config, shape, mesh)
    reports = []
    with report.no_persistent_cache():
        for program in programs:
            reports.append(report.compile_program(program))
            print(report.describe(reports[-1], target), file=sys.stderr)
        if target.platform == "gpu":
            pass  # XLA's GPU cost analysis counts no FLOPs: unrolled counting compiles would count none either
        elif args.no_flop_count:
            if jobs.has_loops(args.job, shape, mesh):
                for r in reports:
                    r.flops_method = "compiled (loop bodies counted once)"
        elif jobs.has_loops(args.job, shape, mesh) and not any(r.error for r in reports):
            from cogstream_jax.compilecheck.flops import unrolled_flops

            print("the job runs loops (layer scan, micro-batch accumulation) whose body XLA counts once: FLOPs from "
                  "1- and 2-layer compiles with every loop unrolled",
                  file=sys.stderr)
            counts = unrolled_flops(jobs.BUILDERS[args.job], config, shape, mesh,
                                    functools.partial(report.program_flops, platform=target.platform))
            for r, flops in zip(reports, counts):
                r.flops_per_chip, r.flops_method = flops, "layer extrapolation"
        elif target.platform == "tpu":
            for program, r in zip(programs, reports):
                if not program.runs_a_loop and report.has_while_loops(r.executable):
                    print(f"{r.name}: the program loops (XLA's windowed einsums over shards, or our own), and XLA "
                          "counts a loop body once: FLOPs from a second compile without windowed einsums",
                          file=sys.stderr)
                    r.flops_per_chip, loops = report.flop_count(program, target.platform)
                    r.flops_method = ("without windowed einsums; other loops counted once (a lower bound)" if loops
                                      else "compiled without windowed einsums")
    result = {**report.summary(args.job, target, mesh_shape, reports, time.perf_counter() - start),
              "attention": attention}
    if args.save_compiled:
        compiled_store.save(args.save_compiled, reports)
        if args.job == "stage1" and not shape.length_buckets:
            print(f"note: saved the gradient of the longest padded length only ({programs[-1].label}); a run pads "
                  "shorter batches to shorter lengths and compiles those (--length_buckets all saves every one)",
                  file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    hbm = target.generation.hbm_bytes
    too_big = [r for r in reports if r.error or r.per_chip_bytes > hbm]
    for r in too_big:
        needs = report.gib(r.per_chip_bytes)
        needs = f"more than {needs} (XLA: {r.error})" if r.error else needs
        print(f"does not fit: {r.name} ({r.label}) needs {needs} per device, a {target.name} device has "
              f"{report.gib(hbm)} HBM", file=sys.stderr)
    hint = remat_hint([r for p, r in zip(programs, reports) if p.trains], hbm, shape.remat)
    if hint:
        print(hint, file=sys.stderr)
    return EXIT_DOES_NOT_FIT if too_big else 0


def remat_hint(training: list, hbm: int, remat: str | None) -> str | None:
    """What to try when a training program (`training`: its reports) does not fit or leaves under 10% of HBM
    free while activations, which `--remat offload` moves to the host, are most of what it holds (None: nothing
    to suggest, e.g. the weights alone are too large, or the layer inputs are already offloaded; `remat` None: the
    job's default, full)."""
    if remat == "offload":
        return None
    keeps_more = remat in ("dots", "none")  # than full, which keeps only the layer inputs
    for r in training:
        if r.error:  # XLA refused it, no breakdown (its "HLO temporaries" also hold gathered weights and logits):
            suggest = keeps_more  # keeping fewer activations is the first thing to try
        else:
            suggest = r.per_chip_bytes > TIGHT_SHARE * hbm and r.temp_bytes >= r.per_chip_bytes / 2
        if suggest:
            state = ("does not fit" if r.error or r.per_chip_bytes > hbm
                     else f"leaves under {1 - TIGHT_SHARE:.0%} of HBM free")
            instead = ("--remat full keeps only the decoder layers' inputs, --remat offload keeps those in host memory"
                       if keeps_more else "--remat offload keeps the decoder layers' inputs in host memory instead")
            why = "" if r.error else ", mostly activations"
            return f"{r.name} {state}{why}: {instead} (or give the mesh a tensor axis)"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(forward(argv))
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
