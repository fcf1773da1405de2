"""Real checkpoint folders for the weights tests: a tiny transformers VideoLLaMA3 written with the safetensors
library in the transformers-native layout, and the same tensors renamed to the original VideoLLaMA3 layout.

The renaming here is written from spec section 7.2 independently of `cogstream_jax.weights.keys`, so the tests
check the key tables rather than reuse them.
"""
from __future__ import annotations

import functools
import json
import pathlib

import numpy as np
import torch
from flax import nnx
from safetensors.torch import save_file

from cogstream_jax.config import ModelConfig
from torch_reference import build_torch_model, random_pixels, tiny_hf_config, torch_logits

#: native prefix -> original prefix (spec 7.2), applied in this order
NATIVE_TO_ORIGINAL = (("model.vision_model.", "model.vision_encoder."), ("model.projector.", "model.mm_projector."),
                      ("model.language_model.", "model."))

# an image (grid 1x4x6, merge 1) and a video (grid 2x4x6, merge 2) in one request
GRIDS, MERGES = [[1, 4, 6], [2, 4, 6]], [1, 2]
IMAGE_ID, VIDEO_ID = 150, 151


@functools.lru_cache(maxsize=None)
def torch_model(seed: int = 3):
    """A tiny transformers model (vision 32, LLM 64, 4 heads / 2 kv heads, vocab 160; all divisible by 8)."""
    return build_torch_model(tiny_hf_config(), seed=seed)


def to_original_key(key: str) -> str:
    for native, original in NATIVE_TO_ORIGINAL:
        if key.startswith(native):
            return original + key[len(native):]
    return key


def torch_state(model, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}


def write_native(model, folder: pathlib.Path, dtype: torch.dtype = torch.float32) -> pathlib.Path:
    """config.json as transformers writes it + model.safetensors with the native keys."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(str(folder / "config.json"))
    save_file(torch_state(model, dtype), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def write_original(model, folder: pathlib.Path, n_shards: int = 3, dtype: torch.dtype = torch.float32) -> pathlib.Path:
    """Original-layout config.json + `n_shards` safetensors shards + index json, like the released checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.from_hf_config(model.config.to_dict()).to_hf_config("original")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {to_original_key(k): v for k, v in torch_state(model, dtype).items()}
    keys = list(state)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(keys)), n_shards)):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({keys[j]: state[keys[j]] for j in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({keys[j]: name for j in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


def params_of(model) -> dict[tuple[str, ...], np.ndarray]:
    """{path: host array} of every Param (compared bit for bit by the tests)."""
    return {tuple(str(p) for p in path): np.asarray(var.get_value())
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b) -> None:
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys()
    for path in pa:
        assert pa[path].dtype == pb[path].dtype, path
        np.testing.assert_array_equal(pa[path], pb[path], err_msg=str(path))


def multimodal_inputs():
    """(input_ids, pixel_values) for one image and one video: 24 + 12 placeholders."""
    pix = np.concatenate([random_pixels(24, 11), random_pixels(48, 12)])
    ids = np.asarray([[1, 2] + [IMAGE_ID] * 24 + [3] + [VIDEO_ID] * 12 + [4, 5]], np.int64)
    return ids, pix


def reference_logits(model) -> np.ndarray:
    """transformers' logits for `multimodal_inputs()`."""
    ids, pix = multimodal_inputs()
    return torch_logits(model, input_ids=ids, pixel_values=pix[:24], image_grid_thw=GRIDS[:1], image_merge_sizes=[1],
                        pixel_values_videos=pix[24:], video_grid_thw=GRIDS[1:], video_merge_sizes=[2])


def our_logits(model) -> np.ndarray:
    ids, pix = multimodal_inputs()
    return np.asarray(model(ids, pix, GRIDS, MERGES).logits)
