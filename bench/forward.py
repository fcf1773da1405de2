"""Prefill forward: jitted JAX vs transformers (torch CPU, sdpa), fp32, same random weights, same work.

Work per call: vision tower + projector + LLM over one 16-frame video (224x224 -> 64 merged tokens per frame) and
200 text tokens, logits of the last position only (as in generation prefill). Headline value = torch / JAX time.
Run: `.venv/bin/python bench/forward.py [--repeats 5]`.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import VideoLlama3Config, VideoLlama3ForConditionalGeneration  # noqa: E402

from bench.common import emit, machine, median, time_call  # noqa: E402
from cogstream_jax import config as configs  # noqa: E402
from cogstream_jax.model.videollama3 import VideoLlama3  # noqa: E402
from cogstream_jax.model.vision import VisualLayout  # noqa: E402
from cogstream_jax.weights.assign import assign_hf_tensors  # noqa: E402

FRAMES, GRID, TEXT = 16, 16, 200


def build_models():
    cfg = configs.bench()
    hf = VideoLlama3Config(**{k: v for k, v in cfg.to_hf_config("native").items()
                              if k not in ("architectures", "model_type", "use_token_compression")})
    hf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    tm = VideoLlama3ForConditionalGeneration(hf).eval()
    jm = VideoLlama3(cfg)
    assign_hf_tensors(jm, ((k, v.detach().numpy()) for k, v in tm.state_dict().items()), "native")
    return cfg, tm, jm


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    cfg, tm, jm = build_models()
    rng = np.random.default_rng(0)
    n_tokens = FRAMES * (GRID // 2) ** 2
    pix = rng.standard_normal((FRAMES * GRID * GRID, 588), dtype=np.float32)
    text = rng.integers(0, 150000, TEXT).tolist()
    ids = np.asarray([text[:20] + [cfg.image_token_id] * n_tokens + text[20:]], np.int32)
    grid = np.asarray([[FRAMES, GRID, GRID]])
    layout = VisualLayout.from_arrays(grid, [2])
    length = ids.shape[1]

    graphdef, state = nnx.split(jm)

    @jax.jit
    def jax_prefill(state, ids, pix):
        model = nnx.merge(graphdef, state)
        out = model.forward(ids, pixel_values=pix, layout=layout, logits_positions=jnp.asarray([[length - 1]]))
        return out.logits

    j_ids, j_pix = jnp.asarray(ids), jnp.asarray(pix)
    t_ids, t_pix, t_grid = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(pix), torch.as_tensor(grid)

    def torch_prefill():
        with torch.no_grad():
            h = tm.model(input_ids=t_ids, pixel_values_videos=t_pix, video_grid_thw=t_grid,
                         video_merge_sizes=torch.tensor([2]), use_cache=False).last_hidden_state
            return tm.lm_head(h[:, -1:])

    ref = torch_prefill().numpy()
    ours = np.asarray(jax_prefill(state, j_ids, j_pix))
    max_diff = float(np.abs(ours - ref).max())
    t_jax = time_call(lambda: jax_prefill(state, j_ids, j_pix).block_until_ready(), repeats=args.repeats)
    t_torch = time_call(torch_prefill, repeats=args.repeats)
    for name, ts in (("jax", t_jax), ("torch", t_torch)):
        print(f"{name:6s} prefill: median {median(ts) * 1e3:8.1f} ms  runs {[round(t * 1e3, 1) for t in ts]}")
    emit("forward", median(t_torch) / median(t_jax), jax_ms=median(t_jax) * 1e3, torch_ms=median(t_torch) * 1e3,
         tokens=length, visual_tokens=n_tokens, max_abs_logit_diff=max_diff, dtype="float32",
         torch_threads=torch.get_num_threads(), **machine())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
