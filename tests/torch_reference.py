"""Tiny transformers VideoLLaMA3 references for parity tests (CPU, fp32, fixed seeds).

Random init makes attention nearly uniform and hides position/mask bugs, so q/k projection weights are scaled
up (spec environment-facts) before the weights are copied into our model.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from transformers import VideoLlama3Config, VideoLlama3ForConditionalGeneration

from cogstream_jax.config import ModelConfig
from cogstream_jax.model.videollama3 import VideoLlama3
from cogstream_jax.weights.assign import assign_hf_tensors

IMAGE_ID, VIDEO_ID = 150, 151
VOCAB = 160


def tiny_hf_config(kv_heads: int = 2, heads: int = 4, layers: int = 2, image_id: int = IMAGE_ID,
                   video_id: int = VIDEO_ID) -> VideoLlama3Config:
    return VideoLlama3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           patch_size=14),
        text_config=dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=VOCAB,
                         max_position_embeddings=512, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False),
        image_token_id=image_id, video_token_id=video_id)


def build_torch_model(cfg: VideoLlama3Config, seed: int = 0, qk_scale: float = 12.0):
    torch.manual_seed(seed)
    model = VideoLlama3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(qk_scale)
    return model


def to_jax(torch_model, **kwargs) -> VideoLlama3:
    config = ModelConfig.from_hf_config(torch_model.config.to_dict())
    model = VideoLlama3(config, **kwargs)
    assign_hf_tensors(model, ((k, v.detach().numpy()) for k, v in torch_model.state_dict().items()), "native")
    return model


@functools.lru_cache(maxsize=None)
def reference_pair(kv_heads: int = 2, heads: int = 4, seed: int = 0):
    """(torch model, our model) with identical weights; cached per configuration."""
    tm = build_torch_model(tiny_hf_config(kv_heads=kv_heads, heads=heads), seed=seed)
    return tm, to_jax(tm)


def random_pixels(n_rows: int, seed: int) -> np.ndarray:
    return torch.randn(n_rows, 588, generator=torch.Generator().manual_seed(seed)).numpy()


def torch_logits(model, **kwargs) -> np.ndarray:
    kwargs = {k: torch.as_tensor(v) for k, v in kwargs.items() if v is not None}
    with torch.no_grad():
        return model(**kwargs).logits.float().numpy()
