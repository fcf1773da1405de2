"""7B-shaped CogReasoner on an accelerator (issue 5 item 7): random bf16 weights created on the device, one
180-frame segment (196x336 frames -> 84 merged tokens each, about 15.9k prompt tokens) prefilled with the vision
tower, then a 128-token greedy decode. Reports peak device memory, time to first token (vision + prefill + first
token) and decode tokens/s. Headline value = decode tokens/s.
Run on a GPU: `.venv/bin/python bench/gpu_7b.py`; a CPU smoke run: `--config tiny --frames 4 --new_tokens 8`.
"""
from __future__ import annotations

import argparse
import os
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
from cogstream_jax.model.videollama3 import VideoLlama3  # noqa: E402

GRID_H, GRID_W = 14, 24  # 196 x 336 pixels: the 180-frame budget of a 360x640 stream (spec 4.2)


def random_model(cfg, dtype):
    """Parameters drawn directly on the default device (nothing large crosses from the host)."""
    make = lambda: VideoLlama3(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype)  # noqa: E731
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.split(make())[1])()
    return nnx.merge(graphdef, state)


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="videollama3_7b", choices=sorted(configs.PRESETS))
    p.add_argument("--frames", type=int, default=180)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args(argv)
    cfg = configs.PRESETS[args.config]()
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    start = time.perf_counter()
    model = random_model(cfg, dtype)
    jax.block_until_ready(nnx.state(model))
    init_s = time.perf_counter() - start
    ids = prompt(cfg, args.frames)
    pixels = np.random.default_rng(1).standard_normal((args.frames * GRID_H * GRID_W, 588)).astype(np.float32)
    kwargs = dict(pixel_values=pixels, grid_sizes=[[args.frames, GRID_H, GRID_W]], merge_sizes=[2],
                  eos_token_ids=(cfg.text.vocab_size + 7,), pad_token_id=0, cache_dtype=dtype)
    for new in (1, args.new_tokens):  # compile both programs
        generate(model, ids, max_new_tokens=new, **kwargs)
    timings = {}
    for new in (1, args.new_tokens):
        start = time.perf_counter()
        generate(model, ids, max_new_tokens=new, **kwargs)
        timings[new] = time.perf_counter() - start
    ttft = timings[1]
    decode_tps = (args.new_tokens - 1) / max(timings[args.new_tokens] - ttft, 1e-9)
    peak = peak_bytes()
    print(f"prompt {ids.shape[1]} tokens, {args.frames} frames; init {init_s:.1f} s; TTFT {ttft:.3f} s; "
          f"decode {decode_tps:.1f} tokens/s; peak memory {peak / 2**30 if peak else float('nan'):.2f} GiB")
    emit("gpu_7b", decode_tps, ttft_s=round(ttft, 4), decode_tokens_per_s=round(decode_tps, 2),
         total_s=round(timings[args.new_tokens], 4), prompt_tokens=int(ids.shape[1]), frames=args.frames,
         peak_gib=None if peak is None else round(peak / 2**30, 3), config=args.config, dtype=args.dtype,
         machine=machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())
