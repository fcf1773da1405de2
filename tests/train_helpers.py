"""Shared pieces of the training tests: a tiny torch/peft reference with identical weights and random batches."""
from __future__ import annotations

import numpy as np
import torch

from cogstream_jax import lora
from cogstream_jax.weights.keys import hf_module_for_our_path
from torch_reference import VOCAB, build_torch_model, tiny_hf_config, to_jax

ALLOWED = tuple(range(10, 26))  # 16 ids inside the tiny vocabulary, standing in for the real allowed set


def peft_pair(spec_fn=lora.language_module_spec, seed: int = 3, b_std: float = 0.05):
    """(peft torch model, our model with the same base + adapter tensors, adapter name, spec); dropout off in torch."""
    import peft

    torch_model = build_torch_model(tiny_hf_config(), seed=seed, qk_scale=4.0)
    ours = to_jax(torch_model)
    config = ours.config
    spec = spec_fn(config)
    native = hf_module_for_our_path(config, "native")
    targets = lora.resolve_targets(config, spec)
    peft_model = peft.get_peft_model(torch_model, peft.LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=[native[p] for p in targets]))
    peft_model.eval()
    g = torch.Generator().manual_seed(seed)
    tensors, modules = {}, {}
    with torch.no_grad():
        for path, original in targets.items():
            layer = peft_model.base_model.model.get_submodule(native[path])
            b = layer.lora_B["default"].weight
            b.copy_(b_std * torch.randn(b.shape, generator=g))
            a = layer.lora_A["default"].weight
            tensors[original] = (a.numpy().T.copy(), b.numpy().T.copy())
            modules[original] = layer
    name = lora.LANGUAGE_MODULE if spec_fn is lora.language_module_spec else lora.FULL_MODULE
    lora.add_adapter(ours, name, spec)
    lora.set_adapter_tensors(ours, name, tensors)
    return peft_model, ours, name, spec, modules


def random_rows(rng: np.random.Generator, rows: int, length: int, n_targets: int, pad: int = 0):
    """Text rows with right padding on odd rows and `n_targets` supervised tokens from ALLOWED at the end."""
    ids = rng.integers(0, VOCAB, (rows, length)).astype(np.int32)
    labels = np.full((rows, length), -100, np.int32)
    mask = np.ones((rows, length), np.int32)
    for r in range(rows):
        end = length - (pad if r % 2 else 0)
        ids[r, end - n_targets:end] = rng.choice(ALLOWED, n_targets)
        labels[r, end - n_targets:end] = ids[r, end - n_targets:end]
        mask[r, end:] = 0
        ids[r, end:] = 0
    return ids, labels, mask


def small_vocab_config(vocab: int = 256):
    """The tiny preset (dims divisible by 8) with a small vocabulary and an in-vocabulary placeholder id."""
    import dataclasses

    from cogstream_jax.config import tiny

    return dataclasses.replace(tiny(vocab), image_token_id=vocab - 6, video_token_id=vocab - 6)


def random_video_batch(config, seed: int = 0, frames: int = 2, grid: int = 4, text: int = 20, answer: int = 6):
    """One multimodal QA: random pixels for a `frames` x grid x grid clip (merge 2), a DiffFP-like mask that drops
    some tokens of the later frames, placeholders for the kept tokens, and an answer at the end."""
    from cogstream_jax.model.vision import VisualLayout
    from cogstream_jax.training.losses import supervised_positions

    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((frames * grid * grid, 588)).astype(np.float32)
    tokens = frames * (grid // 2) ** 2
    mask = np.ones(tokens, bool)
    mask[(grid // 2) ** 2 + 1::2] = False
    kept = int(mask.sum())
    vocab = config.text.vocab_size
    prompt = rng.integers(0, vocab - 8, text).tolist()
    ids = prompt[:5] + [config.video_token_id] * kept + prompt[5:]
    ans = rng.integers(0, vocab - 8, answer).tolist()
    ids = np.asarray(ids + ans, np.int32)[None]
    labels = np.full(ids.shape, -100)
    labels[0, -answer:] = ans
    positions, targets, weights = supervised_positions(labels)
    arrays = {"input_ids": ids, "attention_mask": np.ones_like(ids), "logits_positions": positions,
              "targets": targets, "weights": weights, "pixel_values": pixels, "compression_mask": mask}
    layout = VisualLayout.from_arrays(np.asarray([[frames, grid, grid]]), np.asarray([2]))
    return arrays, layout, kept, labels
