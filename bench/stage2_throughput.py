"""Stage-2 training throughput on the bundled sample (issue 14): tiny random model, one QA per update (or
`--global_batch_qas`), `--steps` updates, persistent compilation cache off.

Prints QAs/s (whole run, and after the first `--warm` updates), the model-sized programs compiled (those taking
the vision tower's or the LLM's weights, by name and argument shapes; and of those the gradient programs, one per
token bucket) after `--warm` updates and at the end, the
share of wall time spent compiling, the padding overhead (padded / real tokens - 1) and the share of wall time
the update loop waited for host preparation (the rest of the host work overlapped device time), then one JSON
line. Run: `python bench/stage2_throughput.py [--steps 100] [--mesh 1,1,1]` (CPU: set
XLA_FLAGS=--xla_force_host_platform_device_count=N for N fake devices).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warm", type=int, default=24)
    p.add_argument("--global_batch_qas", type=int, default=1)
    p.add_argument("--mesh", default="1,1,1")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--output_dir", default=None)
    p.add_argument("--token_buckets", default="auto", help="train-stage2's flag: auto, ladder or a list")
    args = p.parse_args()

    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    from flax import nnx

    from cogstream_jax.compile_log import CompileLog
    from cogstream_jax.config import tiny
    from cogstream_jax.data.synth import sample_dataset_dir
    from cogstream_jax.model.videollama3 import VideoLlama3
    from train.stage2 import main as stage2_main

    sample = sample_dataset_dir()
    out = pathlib.Path(args.output_dir or tempfile.mkdtemp(prefix="stage2-bench-"))
    logging = 4 if args.warm % 4 == 0 and args.steps % 4 == 0 else 1
    argv = ["--model_path", "tiny", "--video_dir", str(sample / "event_segments"), "--query_dir",
            str(sample / "QA_Dataset"), "--num_epochs", str(args.epochs), "--dtype", "float32", "--no_progress",
            "--seed", "0", "--global_batch_qas", str(args.global_batch_qas), "--mesh", args.mesh,
            "--max_steps", str(args.steps), "--logging_steps", str(logging), "--output_dir", str(out),
            "--token_buckets", args.token_buckets]
    shapes = nnx.eval_shape(lambda: VideoLlama3(tiny(), rngs=nnx.Rngs(0)))
    towers = (nnx.state(shapes.vision_encoder), nnx.state(shapes.language_model))
    started = time.perf_counter()
    with CompileLog() as log:
        code = stage2_main(argv)
    wall = time.perf_counter() - started
    if code != 0:
        print(f"train-stage2 exited {code}", file=sys.stderr)
        return code
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {m["step"]: m for m in metrics if "model_programs_compiled" in m}
    warm, last = logged.get(args.warm), logged[max(logged)]
    first_t = {m["step"]: m["time"] for m in metrics}
    steady = None
    if args.warm in first_t and max(first_t) > args.warm:
        span = first_t[max(first_t)] - first_t[args.warm]
        steady = (max(first_t) - args.warm) * args.global_batch_qas / span if span > 0 else None
    programs = log.model_sized(*towers)
    for prog in programs:
        print(f"compiled {prog.name:16s} {prog.seconds:6.2f} s  {prog.argument_shapes[-8:]}", file=sys.stderr)
    qas_per_s = round(args.steps * args.global_batch_qas / wall, 3)
    result = {
        "bench": "stage2_throughput", "value": qas_per_s, "qas_per_s": qas_per_s,
        "qas_per_s_after_warm": None if steady is None else round(steady, 3),
        "model_programs_compiled_at_warm": None if warm is None else int(warm["model_programs_compiled"]),
        "gradient_programs_compiled_at_warm": None if warm is None else int(warm["gradient_programs_compiled"]),
        "model_programs_compiled": int(last["model_programs_compiled"]),
        "gradient_programs_compiled": int(last["gradient_programs_compiled"]),
        "compile_share": round(log.compile_seconds / wall, 3),
        "padding_overhead": round(last["padding_overhead"], 3),
        "host_wait_share": round(last["host_wait_share"], 4),
        "wall_s": round(wall, 1), "steps": args.steps, "warm": args.warm, "mesh": args.mesh,
        "global_batch_qas": args.global_batch_qas, "token_buckets": args.token_buckets,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
