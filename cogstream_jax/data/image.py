"""The VideoLLaMA3 image pipeline: resize rule, PIL bicubic, rescale/normalise and block-major patchify
(spec videollama3.md 4.2-4.4), bit-exact with the official `Videollama3ImageProcessor`.

Rescale and normalise are elementwise functions of a uint8 value, so they are applied through a 256-entry
lookup table computed with the official arithmetic (`x * (1/255)` in float64, cast to float32, then
`(v - 0.5) / 0.5` in float32); patchify is a pure permutation, so it can run on uint8 before the table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from cogstream_jax.data.threads import even_chunks, thread_map
from cogstream_jax.errors import InputError

PATCH_SIZE = 14
IMAGE_MERGE_SIZE = 1
VIDEO_MERGE_SIZE = 2


@dataclass(frozen=True)
class ImageConfig:
    """`preprocessor_config.json` fields that change the numbers."""

    patch_size: int = PATCH_SIZE
    min_tokens: int = 16
    max_tokens: int = 16384
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: int = Image.Resampling.BICUBIC


def compute_resize(height: int, width: int, total_frames: int, merge_size: int, *, patch_size: int = PATCH_SIZE,
                   min_tokens: int = 16, max_tokens: int = 16384) -> tuple[int, int]:
    """Target (h, w) of the official `simple_batched_resize` (all items share one merge size).

    `total_frames` counts every frame of every item in the call (an image counts 1): the token budget is
    shared by all of them, while the minimum area is per frame.
    """
    if height <= 0 or width <= 0 or total_frames <= 0:
        raise InputError(f"compute_resize: height, width and total_frames must be positive, got "
                         f"{height}, {width}, {total_frames}")
    factor = patch_size * merge_size
    min_pixels = min_tokens * factor * factor
    max_pixels = max_tokens * factor * factor
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels // total_frames:
        beta = math.sqrt((height * width) / (max_pixels // total_frames))
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    if h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def compute_mixed_resize(items: Sequence[tuple[int, int, int, int]], *, patch_size: int = PATCH_SIZE,
                         max_tokens: int = 16384) -> list[tuple[int, int]]:
    """Target sizes of the official `batched_resize`, used when merge sizes differ across items (images
    mixed with videos). `items` = (frames, height, width, merge_size). It has no minimum clamp."""
    factors = [patch_size * m for _, _, _, m in items]
    total = sum(t * math.ceil(h / f) * math.ceil(w / f) for (t, h, w, _), f in zip(items, factors))
    if total > max_tokens:
        beta = math.sqrt(total / max_tokens)
        return [(math.floor(h / beta / f) * f, math.floor(w / beta / f) * f) for (_, h, w, _), f in zip(items, factors)]
    return [(round(h / f) * f, round(w / f) * f) for (_, h, w, _), f in zip(items, factors)]


def value_table(config: ImageConfig = ImageConfig()) -> np.ndarray:
    """float32 [3, 256]: the normalised value of each uint8 level per channel, with the official dtypes."""
    levels = np.arange(256, dtype=np.uint8)
    rescaled = (levels * config.rescale_factor).astype(np.float32)  # float64 multiply, then float32
    mean = np.asarray(config.image_mean, dtype=np.float32)[:, None]
    std = np.asarray(config.image_std, dtype=np.float32)[:, None]
    return (rescaled[None, :] - mean) / std


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InputError(f"frames: expected uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    return frames


def resize_frames(frames: np.ndarray, size: tuple[int, int], resample: int = Image.Resampling.BICUBIC) -> np.ndarray:
    """PIL resize of each uint8 HWC frame to (h, w); uint8 [T, h, w, 3] out."""
    frames = _check_frames(frames)
    height, width = size
    if frames.shape[1:3] == (height, width):
        return frames
    out = np.empty((frames.shape[0], height, width, 3), np.uint8)
    for index, frame in enumerate(frames):
        out[index] = np.asarray(Image.fromarray(frame).resize((width, height), resample=resample))
    return out


def preprocess_frames(frames: np.ndarray, size: tuple[int, int], config: ImageConfig = ImageConfig()) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float32 [T, 3, h, w]: PIL bicubic, rescale, normalise (spec 4.3)."""
    resized = resize_frames(frames, size, config.resample)
    table = value_table(config)
    channels = resized.transpose(0, 3, 1, 2)
    return np.stack([table[c][channels[:, c]] for c in range(3)], axis=1)


def _patch_grid(height: int, width: int, merge_size: int, patch_size: int) -> tuple[int, int]:
    """(gh, gw) patches of an image of that size; it must tile into merged blocks."""
    if height % (patch_size * merge_size) or width % (patch_size * merge_size):
        raise InputError(f"patchify: size {height}x{width} is not a multiple of patch {patch_size} x merge "
                         f"{merge_size}")
    return height // patch_size, width // patch_size


def _block_major(array: np.ndarray, merge_size: int, patch_size: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """[T, C, H, W] -> [T*gh*gw, C*p*p] rows ordered frame, merged block (raster), patch in block, (C, y, x)."""
    t, c, h, w = array.shape
    gh, gw = _patch_grid(h, w, merge_size, patch_size)
    blocks = array.reshape(t, c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    blocks = blocks.transpose(0, 2, 5, 3, 6, 1, 4, 7)
    return blocks.reshape(t * gh * gw, c * patch_size * patch_size), (t, gh, gw)


def patchify(pixels: np.ndarray, merge_size: int, patch: int = PATCH_SIZE) -> tuple[np.ndarray, tuple[int, int, int]]:
    """float [T, 3, h, w] -> ([T*gh*gw, 588], (t, gh, gw)) in the block-major order of spec 4.4."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 4:
        raise InputError(f"patchify: expected pixels [T, 3, h, w], got shape {list(pixels.shape)}")
    rows, grid = _block_major(pixels, merge_size, patch)
    return np.ascontiguousarray(rows), grid


def _encode_rows(frames: np.ndarray, size: tuple[int, int], merge_size: int, config: ImageConfig,
                 table: np.ndarray, out: np.ndarray) -> None:
    """Resize, permute to block-major uint8 rows, and write their normalised values into `out`."""
    resized = resize_frames(frames, size, config.resample)
    rows, _ = _block_major(resized.transpose(0, 3, 1, 2), merge_size, config.patch_size)
    area = config.patch_size * config.patch_size
    if np.all(table == table[0]):
        np.take(table[0], rows, out=out)
        return
    for c in range(3):
        out[:, c * area:(c + 1) * area] = table[c][rows[:, c * area:(c + 1) * area]]


def frames_to_patches(frames: np.ndarray, size: tuple[int, int], merge_size: int,
                      config: ImageConfig = ImageConfig(), threads: int = 1) -> tuple[np.ndarray, tuple[int, int, int]]:
    """`patchify(preprocess_frames(frames, size), merge_size)` computed faster: resize, permute the uint8
    pixels into block-major rows, then map them through the value table (identical float32 results).

    Rows are frame-major, so `threads` workers each encode a contiguous run of frames into their own slice
    of the output (the same bytes for any thread count).
    """
    frames = _check_frames(frames)
    grid = (frames.shape[0], *_patch_grid(*size, merge_size, config.patch_size))
    per_frame = grid[1] * grid[2]
    out = np.empty((frames.shape[0] * per_frame, 3 * config.patch_size ** 2), np.float32)
    table = value_table(config)

    def encode(indices: range) -> None:
        _encode_rows(frames[indices.start:indices.stop], size, merge_size, config, table,
                     out[indices.start * per_frame:indices.stop * per_frame])

    thread_map(encode, even_chunks(len(frames), threads), threads)
    return out, grid
