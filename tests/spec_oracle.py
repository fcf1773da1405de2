"""Test helper: the spec's image pipeline written out plainly (numpy + PIL), used as the parity oracle."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image


def naive_resize(height: int, width: int, total_frames: int, merge: int) -> tuple[int, int]:
    """Spec 4.2 (`simple_batched_resize`), word for word."""
    factor = 14 * merge
    min_pixels, max_pixels = 16 * factor * factor, 16384 * factor * factor
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels // total_frames:
        beta = math.sqrt(height * width / (max_pixels // total_frames))
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    if h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def naive_pixels(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Spec 4.3: PIL bicubic on uint8, x * (1/255) in float64 -> float32, (v - 0.5) / 0.5 in float32; CHW."""
    out = []
    for frame in frames:
        resized = np.array(Image.fromarray(frame).resize((size[1], size[0]), Image.BICUBIC))
        scaled = (resized.transpose(2, 0, 1).astype(np.float64) * (1 / 255)).astype(np.float32)
        out.append((scaled - np.float32(0.5)) / np.float32(0.5))
    return np.stack(out)


def naive_patchify(pixels: np.ndarray, m: int) -> np.ndarray:
    """Spec 4.4 with explicit loops: frame, merged block (raster), patch inside the block, (C, y, x)."""
    t, _, h, w = pixels.shape
    gh, gw = h // 14, w // 14
    rows = []
    for f in range(t):
        for by in range(gh // m):
            for bx in range(gw // m):
                for py in range(m):
                    for px in range(m):
                        y0, x0 = (by * m + py) * 14, (bx * m + px) * 14
                        rows.append(pixels[f, :, y0:y0 + 14, x0:x0 + 14].reshape(-1))
    return np.stack(rows)
