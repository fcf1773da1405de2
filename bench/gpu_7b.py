"""7B-shaped CogReasoner on an accelerator (issues 5 and 15): random bf16 weights created on the device, one
180-frame segment (196x336 frames -> 84 merged tokens each, about 15.9k prompt tokens): the vision tower, the
prefill (fused attention: `--attn auto` is splash on TPU, cuDNN on GPU) and a 128-token greedy decode, each
timed on its own (warm-up excluded, median of `--repeats`), against the roofline of the device:
- decode (batch 1) reads every LLM weight but the embedding table and the whole KV cache per token: HBM-bound,
  roofline tokens/s = HBM bandwidth / those bytes;
- prefill does 2 * weights * T + causal attention 2 * T^2 * heads * head_dim * layers FLOPs and reads the
  weights once: the roofline is the slower of the compute (dense bf16 peak) and the HBM bounds.
Also: peak device memory (`memory_stats()`), the number of backend compiles (warm-up and timed runs: the timed
runs must add none) and the stack's versions. Headline value = decode tokens/s.
Run on a GPU: `python bench/gpu_7b.py`; a CPU smoke run: `--config tiny --frames 4 --new_tokens 8`.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import emit, machine  # noqa: E402
from cogstream_jax import config as configs  # noqa: E402
from cogstream_jax.model.generate import generate  # noqa: E402
from cogstream_jax.model.videollama3 import VideoLlama3, use_attention  # noqa: E402
from cogstream_jax.model.vision import VisualLayout  # noqa: E402

GRID_H, GRID_W = 14, 24  # 196 x 336 pixels: the 180-frame budget of a 360x640 stream (spec 4.2)

#: (device_kind substring, dense bf16 TFLOP/s, HBM TB/s) from the vendors' datasheets; first match wins
DEVICE_PEAKS = (("H200", 989.0, 4.8), ("H100", 989.0, 3.35), ("A100", 312.0, 2.04), ("L4", 121.0, 0.3),
                ("TPU v6", 918.0, 1.64), ("TPU v5p", 459.0, 2.76), ("TPU v5", 197.0, 0.82), ("TPU v4", 275.0, 1.2))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _draw(key, shape: tuple, dtype, fill: str):
    if fill == "ones":
        return jnp.ones(shape, dtype)
    if fill == "zeros":
        return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_model(cfg, dtype):
    """Random weights drawn on the default device one parameter at a time, so one small program per distinct shape
    (norm scales 1, biases 0, matrices N(0, 0.02)). Drawing the whole 7B state in one jitted program took 3.5 min
    to compile on an H200 (jax 0.11.2) and then failed in ptxas."""
    make = lambda: VideoLlama3(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype)  # noqa: E731
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    key = jax.random.key(0)
    leaves = []
    for i, (path, var) in enumerate(nnx.to_flat_state(abstract)):
        fill = "normal" if len(var.shape) > 1 else ("zeros" if path[-1] == "bias" else "ones")
        leaves.append((path, var.replace(_draw(jax.random.fold_in(key, i), tuple(var.shape), var.dtype, fill))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def prompt(cfg, frames: int) -> np.ndarray:
    tokens = (GRID_H // 2) * (GRID_W // 2)
    rng = np.random.default_rng(0)
    ids = list(rng.integers(0, 150000, 20))
    for _ in range(frames):
        ids += list(rng.integers(0, 150000, 6)) + [cfg.image_token_id] * tokens
    ids += list(rng.integers(0, 150000, 30))
    return np.asarray([ids], np.int32)


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


class CompileCounter:
    """Counts XLA backend compiles (jax.monitoring's backend-compile duration events)."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event.endswith("backend_compile_duration"):
            self.count += 1


def device_peaks(tflops: float | None, hbm_tbps: float | None) -> tuple[float | None, float | None]:
    kind = jax.devices()[0].device_kind
    row = next((r for r in DEVICE_PEAKS if r[0].lower() in kind.lower()), (None, None, None))
    return tflops or row[1], hbm_tbps or row[2]


def decode_bytes(model, cache_len: int, cache_itemsize: int) -> tuple[int, int]:
    """(LLM weight bytes read per decoded token: every layer, the final norm and lm_head, not the embedding
    table; KV-cache bytes read per token: the dense decode attends over every cache slot)."""
    state = nnx.state(model.language_model)
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    table = model.language_model.embed_tokens.embedding
    weights += model.lm_head.kernel.size * model.lm_head.kernel.dtype.itemsize - table.size * table.dtype.itemsize
    t = model.config.text
    kv = t.num_hidden_layers * 2 * cache_len * t.num_key_value_heads * t.head_dim * cache_itemsize
    return int(weights), int(kv)


def prefill_flops(model, tokens: int) -> float:
    t = model.config.text
    state = nnx.state(model.language_model)
    dense = sum(x.size for x in jax.tree.leaves(state)) - model.language_model.embed_tokens.embedding.size
    attention = 2.0 * tokens * tokens * t.num_attention_heads * t.head_dim * t.num_hidden_layers
    return 2.0 * dense * tokens + attention


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="videollama3_7b", choices=sorted(configs.PRESETS))
    p.add_argument("--frames", type=int, default=180)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--attn", default="auto", help="attention implementation (attention.IMPLS)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak_tflops", type=float, default=None, help="dense peak (default: from the device kind)")
    p.add_argument("--hbm_tbps", type=float, default=None, help="HBM bandwidth (default: from the device kind)")
    args = p.parse_args(argv)
    from bench.gpu_attention import stack_versions

    versions = stack_versions()
    print("stack: " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    compiles = CompileCounter()
    cfg = configs.PRESETS[args.config]()
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    start = time.perf_counter()
    model = random_model(cfg, dtype)
    jax.block_until_ready(nnx.state(model))
    init_s = time.perf_counter() - start
    impl = use_attention(model, args.attn)
    ids = prompt(cfg, args.frames)
    pixels = jnp.asarray(np.random.default_rng(1).standard_normal((args.frames * GRID_H * GRID_W, 588)),
                         jnp.float32)
    layout = VisualLayout(((args.frames, GRID_H, GRID_W),), (2,))
    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda st, px: nnx.merge(graphdef, st).encode_visual(px, layout))
    kwargs = dict(eos_token_ids=(cfg.text.vocab_size + 7,), pad_token_id=0, cache_dtype=dtype)

    def vision():
        return jax.block_until_ready(encode(state, pixels))

    features = vision()
    run = {new: (lambda new=new: generate(model, ids, max_new_tokens=new, visual_features=features, **kwargs))
           for new in (1, args.new_tokens)}
    start = time.perf_counter()
    for fn in run.values():
        fn()  # compile prefill and both decode loops
    warmup_s, warmup_compiles = time.perf_counter() - start, compiles.count
    vision_s = timed(vision, args.repeats)
    prefill_s = timed(run[1], args.repeats)  # prefill + the first token
    total_s = timed(run[args.new_tokens], args.repeats)
    timed_compiles = compiles.count - warmup_compiles
    prompt_tokens = int(ids.shape[1])
    decode_tps = (args.new_tokens - 1) / max(total_s - prefill_s, 1e-9)
    prefill_tps = prompt_tokens / prefill_s
    peak_tf, hbm = device_peaks(args.peak_tflops, args.hbm_tbps)
    weight_bytes, kv_bytes = decode_bytes(model, prompt_tokens + args.new_tokens, jnp.dtype(dtype).itemsize)
    flops = prefill_flops(model, prompt_tokens)
    roof = {}
    if hbm:
        roof["decode_roofline_tokens_per_s"] = round(hbm * 1e12 / (weight_bytes + kv_bytes), 1)
        roof["decode_fraction_of_roofline"] = round(decode_tps / roof["decode_roofline_tokens_per_s"], 3)
    if peak_tf and hbm:
        bound_s = max(flops / (peak_tf * 1e12), weight_bytes / (hbm * 1e12))
        roof["prefill_roofline_tokens_per_s"] = round(prompt_tokens / bound_s, 1)
        roof["prefill_fraction_of_roofline"] = round(prefill_tps / roof["prefill_roofline_tokens_per_s"], 3)
        roof["prefill_model_tflops_per_s"] = round(flops / prefill_s / 1e12, 1)
    peak = peak_bytes()
    print(f"{args.config} {args.dtype}, attention {impl}: prompt {prompt_tokens} tokens ({args.frames} frames); "
          f"init {init_s:.1f} s, warm-up {warmup_s:.1f} s ({warmup_compiles} compiles); vision {vision_s:.3f} s; "
          f"prefill {prefill_s:.3f} s = {prefill_tps:.0f} tokens/s; decode {decode_tps:.1f} tokens/s; "
          f"TTFT {vision_s + prefill_s:.3f} s; compiles in timed runs {timed_compiles}; "
          f"peak memory {peak / 2**30 if peak else float('nan'):.2f} GiB; {roof}", flush=True)
    emit("gpu_7b", decode_tps, value_is="decode tokens/s", attention=impl, prefill_tokens_per_s=round(prefill_tps, 1),
         decode_tokens_per_s=round(decode_tps, 2), vision_s=round(vision_s, 4), prefill_s=round(prefill_s, 4),
         ttft_s=round(vision_s + prefill_s, 4), total_s=round(total_s, 4), prompt_tokens=prompt_tokens,
         frames=args.frames, new_tokens=args.new_tokens, decode_weight_bytes=weight_bytes,
         decode_kv_bytes=kv_bytes, prefill_flops=flops, peak_tflops=peak_tf, hbm_tbps=hbm, **roof,
         compiles_warmup=warmup_compiles, compiles_timed=timed_compiles,
         peak_gib=None if peak is None else round(peak / 2**30, 3), config=args.config, dtype=args.dtype,
         stack=versions, machine=machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())
