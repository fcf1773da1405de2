"""One 7B-shaped stage-2 training step on an accelerator (issue 15), part of `bench/gpu_check.sh`.

Random bf16 VideoLLaMA3-7B weights created on the device, the `full_module` LoRA (r 8 on the LLM's q,k,v,o,gate,
up,down and the projector), one QA through the programs `train-stage2` runs (`training/stage2_device.py`): 180
frames of 14x26 patches (16,380 merged visual tokens, `--keep` of them kept by DiffFP: 12,285), padded into its
token bucket (`stage2_buckets.TOKEN_BUCKETS`), `--answer` supervised positions; the frozen vision tower over the
frame chunks, the gather of the QA's visual inputs, the bucketed gradient (decoder-layer remat `--remat`), then the
AdamW update (`TrainSetup.apply`). Attention: `--attn auto` (cuDNN on GPU, splash on TPU). Reports the compiles of
the first step and of the timed steps (which must add none), the step time (median of `--repeats`), tokens/s,
peak device memory (`memory_stats()`) and compile-check's reading of the same gradient program.
Headline value = step seconds. A CPU smoke run: `--config tiny --frames 2 --repeats 1`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from bench.common import emit, machine  # noqa: E402
from bench.gpu_7b import CompileCounter, peak_bytes, random_model  # noqa: E402
from cogstream_jax import config as configs, lora  # noqa: E402
from cogstream_jax.compilecheck.jobs import Program  # noqa: E402
from cogstream_jax.compilecheck.report import compile_program  # noqa: E402
from cogstream_jax.model.videollama3 import use_attention  # noqa: E402
from cogstream_jax.model.vision import VisualLayout  # noqa: E402
from cogstream_jax.sharding import make_mesh  # noqa: E402
from cogstream_jax.training import stage2_buckets as sb  # noqa: E402
from cogstream_jax.training.setup import build_setup  # noqa: E402
from cogstream_jax.training.stage2_device import Stage2Device  # noqa: E402
from cogstream_jax.training.step import StepOptions  # noqa: E402

GRID_H, GRID_W = 14, 26


def synthetic_qa(cfg, frames: int, keep: float, answer: int):
    """One QA of `frames` frames, `keep` of its visual tokens kept, shaped like the stage-2 stream's (zeros)."""
    layout = VisualLayout(((frames, GRID_H, GRID_W),), (2,))
    kept = max(1, int(layout.num_tokens * keep))
    tokens = kept + 40 + 6 * frames + 30 + answer  # system/question text, per-frame timestamps, answer
    return sb.synthetic_qa(layout, tokens, kept, answer, patch_dim=cfg.vision.patch_dim)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="videollama3_7b", choices=sorted(configs.PRESETS))
    p.add_argument("--frames", type=int, default=180)
    p.add_argument("--keep", type=float, default=0.75, help="fraction of visual tokens the compression mask keeps")
    p.add_argument("--answer", type=int, default=64, help="supervised answer tokens")
    p.add_argument("--remat", default="full", help="decoder-layer remat policy (qwen2.REMAT_POLICIES)")
    p.add_argument("--attn", default="auto", help="attention implementation (attention.IMPLS)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    from bench.gpu_attention import stack_versions

    versions = stack_versions()
    print("stack: " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    compiles = CompileCounter()
    cfg = configs.PRESETS[args.config]()
    start = time.perf_counter()
    model = random_model(cfg, jnp.bfloat16)
    mesh = make_mesh("1,1,1", devices=jax.devices()[:1])
    impl = use_attention(model, args.attn, mesh=mesh)
    setup = build_setup(model, lora.FULL_MODULE, lora.full_module_spec(cfg), optax.adamw(1e-4), mesh, seed=0,
                        options=StepOptions(remat=args.remat))
    jax.block_until_ready(setup.state)
    init_s, init_compiles = time.perf_counter() - start, compiles.count
    qa = synthetic_qa(cfg, args.frames, args.keep, args.answer)
    device = Stage2Device(setup)
    call, frames = sb.synthetic_call(qa, 1, dp=1)
    arrays = {k: device.put(v) for k, v in call.arrays.items()}
    apply_fn = setup.apply()

    def step():
        inputs = device.inputs(call, device.vision(frames))
        grads, losses, _ = device.grad(setup.state, setup.frozen, arrays, inputs)
        setup.state, metrics = apply_fn(setup.state, grads)
        return float(losses[0]), float(metrics["grad_norm"])

    start = time.perf_counter()
    loss, grad_norm = step()
    first_s, first_compiles = time.perf_counter() - start, compiles.count - init_compiles
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    timed_compiles = compiles.count - init_compiles - first_compiles
    tokens, kept = call.bucket[0], qa.num_inputs
    peak = peak_bytes()
    # compile-check's figure for the same program: its memory analysis, as `cogstream compile-check` reads it
    before = compiles.count
    inputs = device.inputs(call, device.vision(frames))
    predicted = compile_program(Program("stage-2 QA gradient", lambda: device.lower_grad(
        setup.state, setup.frozen, arrays, inputs), 1))
    check_compiles = compiles.count - before
    print(f"compile-check's reading of the grad program on this device: {predicted.per_chip_bytes / 2**30:.2f} GiB "
          f"(args {predicted.argument_bytes / 2**30:.2f} + temps {predicted.temp_bytes / 2**30:.2f} GiB), "
          f"{predicted.flops_per_chip / 1e12:.1f} TFLOP; {check_compiles} extra compile(s), "
          f"{predicted.compile_s:.1f} s", flush=True)
    print(f"{args.config} stage-2 step, attention {impl}, remat {args.remat}: {tokens}-token bucket ({qa.num_tokens} "
          f"real, {kept} visual kept of {qa.layout.num_tokens}, {args.frames} frames); init {init_s:.1f} s; first "
          f"step {first_s:.1f} s ({first_compiles} compiles); step {step_s:.3f} s = {tokens / step_s:.0f} tokens/s; "
          f"compiles in timed steps {timed_compiles}; loss {loss:.3f}, grad norm {grad_norm:.3g}; peak memory "
          f"{peak / 2**30 if peak else float('nan'):.2f} GiB", flush=True)
    ok = timed_compiles == 0 and np.isfinite(loss) and np.isfinite(grad_norm)
    emit("gpu_stage2", step_s, value_is="step seconds", ok=bool(ok), attention=impl, remat=args.remat,
         tokens=tokens, visual_tokens_kept=kept, frames=args.frames, step_s=[round(t, 4) for t in times],
         tokens_per_s=round(tokens / step_s, 1), first_step_s=round(first_s, 2), compiles_first_step=first_compiles,
         compiles_timed=timed_compiles, loss=loss, grad_norm=grad_norm,
         peak_gib=None if peak is None else round(peak / 2**30, 3),
         compile_check_grad_gib=round(predicted.per_chip_bytes / 2**30, 3),
         compile_check_grad_tflop=round(predicted.flops_per_chip / 1e12, 2),
         compile_check_extra_compiles=check_compiles,
         achieved_tflops=round(predicted.flops_per_chip / 1e12 / step_s, 1) if predicted.flops_per_chip else None,
         config=args.config, stack=versions,
         machine=machine())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
