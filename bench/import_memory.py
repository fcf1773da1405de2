"""Peak host RSS growth while importing a synthetic ~1 GB, 3-shard bf16 checkpoint (original layout).

    python -m bench.import_memory [--repeats 3] [--skip_torch] [--work_dir DIR]

The parent writes the checkpoint (and, for the PyTorch comparison, the same tensors in the transformers-native
layout), then measures each load in a FRESH subprocess: imports first, then the kernel's peak-RSS counter is reset
(`/proc/self/clear_refs` = 5) and the baseline RSS read, then the load runs and `VmHWM` gives the peak. Headline
`value` = median peak growth / (model size + 3 x largest tensor): streaming import needs the model plus a few
transient copies of one tensor (read buffer, dtype cast, device copy). Target <= 1.0.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.common import reset_peak_rss, status_kib

MiB = 2**20


def bench_config():
    """~1 GB in bf16: vocab 151936 x 1024 embed and lm_head (311 MB each), 8 LLM layers, 6 vision layers."""
    from cogstream_jax.config import ModelConfig, TextConfig, VisionConfig

    return ModelConfig(
        vision=VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=6, num_attention_heads=12),
        text=TextConfig(vocab_size=151936, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                        num_attention_heads=16, num_key_value_heads=4, head_dim=64))


def write_synthetic(folder: str, layout: str, n_shards: int = 3, seed: int = 0) -> dict:
    """Random bf16 tensors (std 0.02) in `n_shards` files + index; returns sizes."""
    import jax.numpy as jnp

    from cogstream_jax.weights.export import export_specs
    from cogstream_jax.weights.loader import abstract_model
    from cogstream_jax.io_utils import atomic_write_json
    from cogstream_jax.weights.safetensors_io import plan_shards, write_checkpoint

    config = bench_config()
    specs = export_specs(abstract_model(config, jnp.bfloat16, jnp.bfloat16), layout)
    total = sum(s.nbytes for s in specs)
    limit = next(total * k // 100 for k in range(34, 101) if len(plan_shards(specs, total * k // 100)) == n_shards)
    rng = np.random.default_rng(seed)

    def produce(spec):
        return (rng.standard_normal(spec.shape, np.float32) * 0.02).astype(spec.dtype)

    files = write_checkpoint(folder, specs, produce, max_shard_bytes=limit)
    atomic_write_json(os.path.join(folder, "config.json"), config.to_hf_config(layout))
    return {"files": files, "model_bytes": total, "largest_tensor_bytes": max(s.nbytes for s in specs),
            "num_tensors": len(specs)}


# ------------------------------------------------------------------------------------------------ child side
def child(which: str, folder: str) -> None:
    """Run inside the fresh subprocess: import, reset the peak, load, report one JSON line."""
    if which == "ours":
        import jax
        from flax import nnx

        from cogstream_jax.weights.loader import load_pretrained

        jax.devices()  # initialise the backend before the baseline

        def load():
            model = load_pretrained(folder, dtype="bfloat16")
            jax.block_until_ready(nnx.state(model))
            return model
    else:
        import torch
        from transformers import VideoLlama3ForConditionalGeneration

        def load():
            return VideoLlama3ForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16)

    reset = reset_peak_rss()
    base_kib = status_kib("VmRSS")
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    peak_kib = status_kib("VmHWM")
    touch_all(model)  # transformers memory-maps safetensors: weights are only read when first used
    print(json.dumps({"baseline_rss_bytes": base_kib * 1024, "peak_rss_bytes": peak_kib * 1024,
                      "growth_bytes": (peak_kib - base_kib) * 1024, "peak_reset": reset, "seconds": seconds,
                      "growth_after_touch_bytes": (status_kib("VmHWM") - base_kib) * 1024,
                      "final_rss_anon_bytes": status_kib("RssAnon") * 1024,
                      "final_rss_file_bytes": status_kib("RssFile") * 1024}))


def touch_all(model) -> None:
    """Read every parameter once (a first forward pass would), so lazily mapped weights count in RSS."""
    if hasattr(model, "parameters"):
        for p in model.parameters():
            float(p.detach().abs().max())
    else:
        import jax
        from flax import nnx

        for leaf in jax.tree.leaves(nnx.state(model)):
            float(abs(leaf).max())


def measure(which: str, folder: str, repeats: int) -> list[dict]:
    runs = []
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-m", "bench.import_memory", "--child", which, "--work_dir", folder],
                             capture_output=True, text=True, env=env, check=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.import_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip_torch", "--skip-torch", action="store_true")
    parser.add_argument("--work_dir", "--work-dir", default=None, help="where to write the synthetic checkpoints")
    parser.add_argument("--child", choices=("ours", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.work_dir)
        return 0

    from bench.common import emit, machine

    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        original, native = os.path.join(tmp, "original"), os.path.join(tmp, "native")
        sizes = write_synthetic(original, "original")
        print(f"checkpoint: {len(sizes['files'])} shards {sizes['files']}, {sizes['num_tensors']} tensors, "
              f"{sizes['model_bytes'] / MiB:.1f} MiB, largest tensor {sizes['largest_tensor_bytes'] / MiB:.1f} MiB")
        ours = measure("ours", original, args.repeats)
        for run in ours:
            print(f"ours  : growth {run['growth_bytes'] / MiB:8.1f} MiB in {run['seconds']:.2f} s ({run})")
        theirs = []
        if not args.skip_torch:
            try:
                import torch  # noqa: F401
                import transformers  # noqa: F401
            except ImportError:
                print("torch/transformers not installed: skipping the PyTorch comparison")
            else:
                write_synthetic(native, "native")
                theirs = measure("torch", native, args.repeats)
                for run in theirs:
                    print(f"torch : growth {run['growth_bytes'] / MiB:8.1f} MiB in {run['seconds']:.2f} s ({run})")
    budget = sizes["model_bytes"] + 3 * sizes["largest_tensor_bytes"]
    growth = statistics.median(r["growth_bytes"] for r in ours)
    raw = {"model_bytes": sizes["model_bytes"], "largest_tensor_bytes": sizes["largest_tensor_bytes"],
           "budget_bytes": budget, "ours_growth_bytes": [r["growth_bytes"] for r in ours],
           "ours_growth_over_model": round(growth / sizes["model_bytes"], 4),
           "ours_growth_after_touch_bytes": [r["growth_after_touch_bytes"] for r in ours],
           "ours_seconds": [round(r["seconds"], 3) for r in ours], "peak_reset": all(r["peak_reset"] for r in ours),
           "n_shards": len(sizes["files"]), "machine": machine()}
    if theirs:
        torch_growth = statistics.median(r["growth_bytes"] for r in theirs)
        raw.update({"torch_growth_bytes": [r["growth_bytes"] for r in theirs],
                    "torch_growth_over_model": round(torch_growth / sizes["model_bytes"], 4),
                    "torch_growth_after_touch_bytes": [r["growth_after_touch_bytes"] for r in theirs],
                    "torch_seconds": [round(r["seconds"], 3) for r in theirs],
                    "torch_final_rss_file_bytes": theirs[0]["final_rss_file_bytes"]})
    emit("import_memory", growth / budget, **raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
