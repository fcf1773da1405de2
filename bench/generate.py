"""Greedy generation: our jitted prefill + `lax.while_loop` decode vs transformers `generate` (torch CPU, sdpa),
fp32, the same random bench-config weights (LLM 896 wide, 8 layers, vocab 151936), a 256-token text prompt and
exactly 128 new tokens (no EOS can stop either side). Headline value = JAX tokens/s / transformers tokens/s.
Run: `.venv/bin/python bench/generate.py [--repeats 3]`.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import emit, machine, median, time_call  # noqa: E402
from bench.forward import build_models  # noqa: E402
from cogstream_jax.model.generate import generate  # noqa: E402

PROMPT, NEW = 256, 128


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    cfg, tm, jm = build_models()
    ids = np.random.default_rng(0).integers(0, 150000, (1, PROMPT)).astype(np.int32)
    never = (cfg.text.vocab_size + 7,)  # an id no logit can produce: both sides run all 128 steps

    def run_jax():
        return generate(jm, ids, max_new_tokens=NEW, eos_token_ids=never, pad_token_id=0)

    def run_torch():
        with torch.no_grad():
            out = tm.generate(input_ids=torch.as_tensor(ids, dtype=torch.long), do_sample=False, max_new_tokens=NEW,
                              min_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
        return out[:, PROMPT:].numpy()

    ours, ref = run_jax(), run_torch()
    agree = float((ours[:, :ref.shape[1]] == ref).mean())
    jax_s = time_call(run_jax, warmup=1, repeats=args.repeats)
    torch_s = time_call(run_torch, warmup=1, repeats=args.repeats)
    jax_tps, torch_tps = NEW / median(jax_s), NEW / median(torch_s)
    print(f"jax           {jax_tps:8.1f} tokens/s  runs {[round(t, 3) for t in jax_s]} s")
    print(f"transformers  {torch_tps:8.1f} tokens/s  runs {[round(t, 3) for t in torch_s]} s")
    emit("generate", jax_tps / torch_tps, jax_tokens_per_s=round(jax_tps, 2), torch_tokens_per_s=round(torch_tps, 2),
         prompt_tokens=PROMPT, new_tokens=NEW, token_agreement=agree, machine=machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())
