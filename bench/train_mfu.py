"""Stage-1 LoRA train step on an accelerator (issue 4): tokens/s and model FLOPs utilisation on a ~1B config
(Qwen2-shaped LLM: hidden 2048, 16 layers, MLP 5632, 16 heads / 2 kv heads, vocab 151936; about 1.3B weights),
bf16, the default stage-1 recipe (LoRA r 8 on q,k,v,o,gate,up,down, dropout 0.1, constrained loss, lm_head only
at the supervised positions), one jitted accumulating step per measurement, warm-up excluded.

FLOPs counted per step, as the issue defines them:
- forward: 2 * N * tokens (N = weights of the decoder layers) + causal attention 2 * T^2 * D per layer and row
  (QK^T and PV over the lower triangle) + lm_head 2 * V * D at the supervised positions;
- backward: through the activations only (the base is frozen): the same again, attention twice;
- LoRA: 2 * r * (in + out) per token and adapted module forward, three times that with its backward.
MFU = FLOPs / step time / peak (a table of dense bf16 peaks by device kind, or `--peak_tflops`).
Headline value = MFU (target >= 0.40 on a GPU; model TFLOP/s where the peak is unknown, e.g. on CPU).
Run on a GPU: `.venv/bin/python bench/train_mfu.py`; a CPU smoke run: `--config tiny --rows 2 --length 128`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from bench.common import emit, machine, time_call  # noqa: E402
from bench.gpu_7b import random_model  # noqa: E402
from cogstream_jax import config as configs, lora  # noqa: E402
from cogstream_jax.lora_tensors import linear_shapes  # noqa: E402
from cogstream_jax.sharding import make_mesh  # noqa: E402
from cogstream_jax.training.batching import step_batch  # noqa: E402
from cogstream_jax.training.setup import build_setup  # noqa: E402
from cogstream_jax.training.step import StepOptions  # noqa: E402

#: dense bf16 peak TFLOP/s by `device_kind` substring (first match wins)
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0), ("TPU v6", 918.0),
               ("TPU v5p", 459.0), ("TPU v5", 197.0), ("TPU v4", 275.0))


def one_b() -> configs.ModelConfig:
    text = dataclasses.replace(configs.bench().text, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                               num_attention_heads=16, num_key_value_heads=2, head_dim=128)
    return dataclasses.replace(configs.bench(), text=text)


CONFIGS = {"1b": one_b, **configs.PRESETS}


def layer_weights(text) -> int:
    d, hd = text.hidden_size, text.head_dim
    q, kv = text.num_attention_heads * hd, text.num_key_value_heads * hd
    return d * q + 2 * d * kv + q * d + 3 * d * text.intermediate_size


def step_flops(cfg, rows: int, length: int, supervised: int, spec: lora.LoraSpec) -> float:
    text = cfg.text
    tokens = rows * length
    dense = 2.0 * layer_weights(text) * text.num_hidden_layers * tokens
    attention = 2.0 * rows * length * length * text.num_attention_heads * text.head_dim * text.num_hidden_layers
    head = 2.0 * text.vocab_size * text.hidden_size * rows * supervised
    sizes = linear_shapes(cfg)
    low_rank = sum(2.0 * spec.r * (sizes[p][0] + sizes[p][1]) for p in lora.resolve_targets(cfg, spec)) * tokens
    return (dense + head) * 2 + attention * 3 + low_rank * 3  # backward: activations only; attention bwd = 2x fwd


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    kind = jax.devices()[0].device_kind
    return next((peak for name, peak in PEAK_TFLOPS if name.lower() in kind.lower()), None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="1b", choices=sorted(CONFIGS))
    p.add_argument("--rows", type=int, default=8, help="sequences per step")
    p.add_argument("--length", type=int, default=2048, help="tokens per sequence (stage-1 max length)")
    p.add_argument("--supervised", type=int, default=16, help="target positions per row (lm_head only there)")
    p.add_argument("--remat", default="none", choices=["full", "dots", "none"], help="decoder-layer remat policy")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak_tflops", type=float, default=None, help="device peak (default: from the device kind)")
    args = p.parse_args(argv)
    cfg = CONFIGS[args.config]()
    model = random_model(cfg, jnp.bfloat16)
    spec = lora.language_module_spec(cfg)
    mesh = make_mesh("1,1,1", devices=jax.devices()[:1])
    setup = build_setup(model, lora.LANGUAGE_MODULE, spec, optax.adamw(2e-4), mesh, seed=0,
                        options=StepOptions(remat=args.remat))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, min(cfg.text.vocab_size, 150000), (args.rows, args.length)).astype(np.int32)
    labels = np.full(ids.shape, -100, np.int64)
    labels[:, -args.supervised:] = ids[:, -args.supervised:]
    batch = jax.device_put(step_batch(ids, labels, np.ones_like(ids), micro_batches=1,
                                      num_positions=args.supervised))
    step = setup.accumulating_step(None)

    def run():
        setup.state, metrics = step(setup.state, setup.frozen, batch)
        jax.block_until_ready(metrics)

    times = time_call(run, repeats=args.repeats)
    seconds = statistics.median(times)
    flops = step_flops(cfg, args.rows, args.length, args.supervised, spec)
    peak = peak_tflops(args.peak_tflops)
    mfu = flops / seconds / (peak * 1e12) if peak else None
    print(f"{args.config}: {seconds * 1e3:.1f} ms/step, {args.rows * args.length / seconds:.0f} tokens/s, "
          f"{flops / seconds / 1e12:.2f} TFLOP/s, MFU {mfu if mfu is None else round(mfu, 4)}", file=sys.stderr)
    value = mfu if mfu is not None else flops / seconds / 1e12  # no known peak (e.g. CPU): report TFLOP/s
    emit("train_mfu", value, value_is="mfu" if mfu is not None else "tflops_per_s (device peak unknown)",
         mfu=mfu, config=args.config, rows=args.rows,
         length=args.length, step_ms=[round(t * 1e3, 1) for t in times], tokens_per_s=round(
             args.rows * args.length / seconds, 1), model_tflops_per_s=round(flops / seconds / 1e12, 3),
         flops_per_step=flops, peak_tflops=peak, device_kind=jax.devices()[0].device_kind, **machine())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
