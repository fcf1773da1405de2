"""LoRA train step (stage-1 style, text only): jitted JAX step vs transformers + peft (torch CPU), fp32.

Same random base weights (bench config), same LoRA targets (q,k,v,o,gate,up,down of every layer, r 8, alpha 16,
dropout 0.1; JAX masks from the training default, the counter-based hash (`--dropout_rng threefry|rbg` for the
bit generators)), same batch (ROWS x 1024 tokens, loss on the last P positions, lm_head only there in both),
AdamW update included in both. Headline value = JAX tokens/s / PyTorch tokens/s (target >= 1.0).
Run: `.venv/bin/python bench/train_step.py [--repeats 5]`. Figures are noisy while other jobs share the CPU.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

from bench.common import emit, machine, median, time_call  # noqa: E402
from bench.forward import build_models  # noqa: E402
from cogstream_jax import lora  # noqa: E402
from cogstream_jax.sharding import make_mesh  # noqa: E402
from cogstream_jax.training.batching import step_batch  # noqa: E402
from cogstream_jax.training.setup import build_setup  # noqa: E402
from cogstream_jax.training.step import StepOptions  # noqa: E402
from cogstream_jax.weights.keys import hf_module_for_our_path  # noqa: E402

ROWS, LENGTH, SUPERVISED = 2, 1024, 64


def torch_step_fn(tm, cfg, ids, labels):
    import peft

    spec = lora.language_module_spec(cfg)
    native = hf_module_for_our_path(cfg, "native")
    targets = [native[p] for p in lora.resolve_targets(cfg, spec)]
    model = peft.get_peft_model(tm, peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                                    target_modules=targets))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    t_ids = torch.as_tensor(ids, dtype=torch.long)
    pos = torch.arange(LENGTH - SUPERVISED - 1, LENGTH - 1)
    tgt = torch.as_tensor(labels[:, LENGTH - SUPERVISED:], dtype=torch.long)
    inner = model.base_model.model

    def step():
        hidden = inner.model(input_ids=t_ids, use_cache=False).last_hidden_state
        logits = inner.lm_head(hidden[:, pos])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dropout_rng", default="hash", choices=["hash", "threefry", "rbg"],
                   help="JAX LoRA-dropout RNG (torch uses its own fast generator)")
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    cfg, tm, jm = build_models()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 150000, (ROWS, LENGTH)).astype(np.int32)
    labels = np.full((ROWS, LENGTH), -100, np.int64)
    labels[:, LENGTH - SUPERVISED:] = ids[:, LENGTH - SUPERVISED:]

    mesh = make_mesh("1,1,1", devices=jax.devices()[:1])
    setup = build_setup(jm, lora.LANGUAGE_MODULE, lora.language_module_spec(cfg), optax.adamw(1e-4), mesh, seed=0,
                        options=StepOptions(dropout_rng=args.dropout_rng))
    jax_step = setup.accumulating_step(None)
    batch = jax.device_put(step_batch(ids, labels, np.ones_like(ids), micro_batches=1, num_positions=SUPERVISED))

    def run_jax():
        setup.state, metrics = jax_step(setup.state, setup.frozen, batch)
        jax.block_until_ready(metrics)

    run_torch = torch_step_fn(tm, cfg, ids, labels)
    t_jax = time_call(run_jax, repeats=args.repeats)
    t_torch = time_call(run_torch, repeats=args.repeats)
    tokens = ROWS * LENGTH
    jax_tps, torch_tps = tokens / median(t_jax), tokens / median(t_torch)
    print(f"jax   {median(t_jax) * 1e3:8.1f} ms/step  {jax_tps:8.0f} tokens/s")
    print(f"torch {median(t_torch) * 1e3:8.1f} ms/step  {torch_tps:8.0f} tokens/s")
    emit("train_step", jax_tps / torch_tps, jax_tokens_per_s=round(jax_tps, 1), torch_tokens_per_s=round(torch_tps, 1),
         jax_ms=[round(t * 1e3, 2) for t in t_jax], torch_ms=[round(t * 1e3, 2) for t in t_torch], rows=ROWS,
         length=LENGTH, dtype="float32", dropout_rng=args.dropout_rng, **machine())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
