"""DiffFP: the VideoLLaMA3 / CogReasoner visual-token compression mask (spec videollama3.md 6.1-6.2) and the
host-side step that removes the dropped `<image>` placeholders from `input_ids`.

A merged token of video frame f is dropped when its m x m patch block is (nearly) identical to the same block
in frame f-1: `mean(|P[f] - P[f-1]|) * 255 <= threshold`. The official evaluation runs this on bf16
`pixel_values` (subtraction in bf16, mean accumulated in fp32 and rounded to bf16, x255 in bf16), so the
default reproduces that; `dtype="float32"` is the native transformers processor's variant.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import ml_dtypes
import numpy as np

from cogstream_jax.data.tokens import IMAGE_TOKEN_ID
from cogstream_jax.errors import InputError

DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def _as_dtype(values: np.ndarray, dtype) -> np.ndarray:
    """Round to the compute dtype (round-to-nearest-even for bf16, like torch `.to(torch.bfloat16)`)."""
    return np.asarray(values).astype(dtype)


def block_differences(blocks: np.ndarray, dtype) -> np.ndarray:
    """[t, tokens, K] -> [t-1, tokens]: `mean(|blocks[f] - blocks[f-1]|, -1) * 255` with torch's dtype rules:
    the inputs are first rounded to `dtype`, each op is computed exactly (float32/float64) and rounded to
    `dtype`; the mean accumulates in wide precision and is rounded once."""
    wide = _as_dtype(blocks, dtype).astype(np.float32)  # the model sees bf16 pixel_values
    diff = _as_dtype(wide[1:] - wide[:-1], dtype)
    mean = _as_dtype((np.abs(diff.astype(np.float64)).sum(axis=-1) / blocks.shape[-1]).astype(np.float32), dtype)
    return _as_dtype(mean.astype(np.float32) * np.float32(255), dtype)


def _video_mask(blocks: np.ndarray, dtype, threshold: float, min_tokens: int) -> np.ndarray:
    differences = block_differences(blocks, dtype)
    keep = np.ones(blocks.shape[:2], dtype=bool)  # frame 0 gets `threshold + 1`, i.e. always kept
    keep[1:] = differences > _as_dtype(np.float32(threshold), dtype)
    starved = keep.sum(axis=1) < min_tokens
    keep[starved, :min_tokens] = True
    return keep


def difffp_mask(
    pixel_values: np.ndarray,
    grid_sizes: Sequence[Sequence[int]],
    merge_sizes: Sequence[int],
    *,
    minor_frame_indices: Iterable[int] = (),
    threshold: float = 0.1,
    min_tokens: int = 1,
    dtype: str = "bfloat16",
    modals: Sequence[str] | None = None,
) -> np.ndarray:
    """One bool per merged visual token, items in order, frame-major then token raster (spec 6.1).

    Images and single-frame videos keep every token. In a video, frame 0 is kept whole, frames with fewer
    than `min_tokens` kept tokens keep their first ones, and frames whose global index (counting every frame
    of every item, images included) is in `minor_frame_indices` keep only token 0. `modals` defaults to
    "image" for merge size 1 and "video" otherwise.
    """
    if dtype not in DTYPES:
        raise InputError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    compute = DTYPES[dtype]
    pixels = np.asarray(pixel_values)
    grids = np.asarray(grid_sizes, dtype=np.int64).reshape(-1, 3)
    merges = [int(m) for m in merge_sizes]
    if len(merges) != len(grids):
        raise InputError(f"merge_sizes: {len(merges)} entries for {len(grids)} grid_sizes rows")
    modals = list(modals) if modals is not None else ["image" if m == 1 else "video" for m in merges]
    rows_per_item = [int(t * h * w) for t, h, w in grids]
    if pixels.ndim != 2 or pixels.shape[0] != sum(rows_per_item):
        raise InputError(f"pixel_values: shape {list(pixels.shape)} does not match grid_sizes "
                         f"({sum(rows_per_item)} rows expected)")
    minor = {int(i) for i in minor_frame_indices}
    masks: list[np.ndarray] = []
    frame_base = 0
    start = 0
    for (t, h, w), m, modal, rows in zip(grids.tolist(), merges, modals, rows_per_item):
        tokens = (h // m) * (w // m)
        if modal == "image" or t == 1:
            masks.append(np.ones(t * tokens, dtype=bool))
        else:
            blocks = pixels[start:start + rows].reshape(t, tokens, -1)
            keep = _video_mask(blocks, compute, threshold, min_tokens)
            for frame in range(t):
                if frame_base + frame in minor:
                    keep[frame] = False
                    keep[frame, 0] = True
            masks.append(keep.reshape(-1))
        frame_base += t
        start += rows
    return np.concatenate(masks) if masks else np.zeros(0, dtype=bool)


def drop_masked_placeholders(input_ids: np.ndarray, mask: np.ndarray, image_token_id: int = IMAGE_TOKEN_ID
                             ) -> np.ndarray:
    """Remove the `<image>` ids whose visual token the mask drops (the k-th `<image>` <-> mask[k]).

    Accepts [L] or [1, L] (batch size 1 only, as the official code asserts) and returns the same rank.
    """
    ids = np.asarray(input_ids)
    flat = ids.reshape(-1) if ids.ndim == 2 and ids.shape[0] == 1 else ids
    if flat.ndim != 1:
        raise InputError(f"input_ids: expected [L] or [1, L], got shape {list(ids.shape)}")
    mask = np.asarray(mask, dtype=bool).reshape(-1)
    is_image = flat == image_token_id
    if int(is_image.sum()) != mask.size:
        raise InputError(f"input_ids: {int(is_image.sum())} <image> placeholders but the mask has {mask.size} "
                         f"entries")
    keep = ~is_image
    keep[is_image] = mask
    kept = flat[keep]
    return kept[None, :] if ids.ndim == 2 else kept
