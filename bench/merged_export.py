"""Merged export of a synthetic ~1 GB bf16 checkpoint + a random `full_module` adapter: time and peak host RSS.

    python -m bench.merged_export [--repeats 3] [--skip_torch] [--work_dir DIR]

Ours: `export_merged_from_dir` streams the 3-shard original-layout base tensor by tensor into a new checkpoint.
Reference: transformers `from_pretrained` (native layout) + `PeftModel.from_pretrained(...).merge_and_unload()` +
`save_pretrained`, the usual PyTorch recipe. Each run is a FRESH subprocess (imports first, then the peak-RSS
counter is reset). Headline `value` = our median peak RSS growth / model size (streaming: far below 1; the
PyTorch recipe holds the whole model). Raw figures include both medians of seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.common import reset_peak_rss, status_kib
from bench.import_memory import bench_config, write_synthetic

MiB = 2**20


def write_adapter(folder: str) -> int:
    """A random full_module adapter (r 8, alpha 16) as a native-layout PEFT folder; returns its module count."""
    from cogstream_jax import lora
    from cogstream_jax.lora_tensors import AdapterTensors, linear_shapes, modules_by_name
    from cogstream_jax.peft_io import write_peft_adapter

    config = bench_config()
    spec = lora.full_module_spec(config)
    targets = lora.resolve_targets(config, spec)  # our path -> original name
    shapes = linear_shapes(config)
    rng = np.random.default_rng(0)
    tensors = {hf: ((0.02 * rng.standard_normal((shapes[p][0], spec.r))).astype(np.float32),
                    (0.02 * rng.standard_normal((spec.r, shapes[p][1]))).astype(np.float32))
               for p, hf in targets.items()}
    assert set(tensors) <= set(modules_by_name(config, "original"))
    write_peft_adapter(AdapterTensors(spec, tensors, None, "bench"), folder, layout="native")
    return len(tensors)


def child(which: str, base: str, adapter: str, out: str) -> None:
    """Inside the fresh subprocess: import, reset the peak, export, report one JSON line."""
    if which == "ours":
        import jax

        from cogstream_jax.merged_export import export_merged_from_dir

        jax.devices()

        def run():
            export_merged_from_dir(base, adapter, out, layout="original")
    else:
        import peft
        import torch
        from transformers import VideoLlama3ForConditionalGeneration

        def run():
            model = VideoLlama3ForConditionalGeneration.from_pretrained(base, dtype=torch.bfloat16)
            merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
            merged.save_pretrained(out)

    reset = reset_peak_rss()
    base_kib = status_kib("VmRSS")
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    print(json.dumps({"growth_bytes": (status_kib("VmHWM") - base_kib) * 1024, "seconds": seconds,
                      "peak_reset": reset}))


def measure(which: str, base: str, adapter: str, out: str, repeats: int) -> list[dict]:
    runs = []
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)  # a fresh folder each time: our export would resume a finished one
        done = subprocess.run([sys.executable, "-m", "bench.merged_export", "--child", which, "--base", base,
                               "--adapter", adapter, "--out", out], capture_output=True, text=True, env=env,
                              check=True, cwd=root)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.merged_export", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip_torch", "--skip-torch", action="store_true")
    parser.add_argument("--work_dir", "--work-dir", default=None, help="where to write the synthetic checkpoints")
    parser.add_argument("--child", choices=("ours", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.base, args.adapter, args.out)
        return 0

    from bench.common import emit, machine

    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        original, native, adapter = (os.path.join(tmp, n) for n in ("original", "native", "adapter"))
        sizes = write_synthetic(original, "original")
        modules = write_adapter(adapter)
        print(f"base: {sizes['model_bytes'] / MiB:.1f} MiB in {len(sizes['files'])} shards; adapter: {modules} modules")
        # warm-up (page cache, compile caches) excluded from the timings
        measure("ours", original, adapter, os.path.join(tmp, "out_ours"), 1)
        ours = measure("ours", original, adapter, os.path.join(tmp, "out_ours"), args.repeats)
        for run in ours:
            print(f"ours  : growth {run['growth_bytes'] / MiB:8.1f} MiB in {run['seconds']:.2f} s")
        theirs = []
        if not args.skip_torch:
            write_synthetic(native, "native")
            measure("torch", native, adapter, os.path.join(tmp, "out_torch"), 1)
            theirs = measure("torch", native, adapter, os.path.join(tmp, "out_torch"), args.repeats)
            for run in theirs:
                print(f"torch : growth {run['growth_bytes'] / MiB:8.1f} MiB in {run['seconds']:.2f} s")
    growth = statistics.median(r["growth_bytes"] for r in ours)
    raw = {"model_bytes": sizes["model_bytes"], "largest_tensor_bytes": sizes["largest_tensor_bytes"],
           "ours_growth_bytes": [r["growth_bytes"] for r in ours],
           "ours_seconds_median": round(statistics.median(r["seconds"] for r in ours), 3),
           "peak_reset": all(r["peak_reset"] for r in ours), "adapter_modules": modules, "machine": machine()}
    if theirs:
        raw.update({"torch_growth_bytes": [r["growth_bytes"] for r in theirs],
                    "torch_growth_over_model": round(statistics.median(r["growth_bytes"] for r in theirs)
                                                     / sizes["model_bytes"], 4),
                    "torch_seconds_median": round(statistics.median(r["seconds"] for r in theirs), 3)})
    emit("merged_export", growth / sizes["model_bytes"], **raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
