"""The frames of a stage-2 call laid out by row, so that pixels never leave the process and device of their QA.

The R rows of a call are split over data x fsdp: `dp` blocks of `k = R / dp` consecutive rows, block j on the
j-th device of those axes (replicated over tensor). Block j's frames are its rows' frames, each row padded to
`frames_per_row` (the call's most, agreed by all processes), then to whole vision chunks of `FRAMES_PER_DEVICE`.
Vision chunk c of the call is [dp * FRAMES_PER_DEVICE] frames whose block j is block j's frames
[c * FRAMES_PER_DEVICE, (c + 1) * FRAMES_PER_DEVICE): the tower's input and output stay on the row's device, and
a process builds only the frames of the rows its devices hold. `token_rows[r]` are row r's visual tokens
(original order) as indices into its block of the flattened vision output [chunks * FRAMES_PER_DEVICE * P / m^2].
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from cogstream_jax.errors import InputError
from cogstream_jax.model.frame_vision import PATCH_BUCKETS, bucket, frame_arrays
from cogstream_jax.model.vision import VisualLayout

FRAMES_PER_DEVICE = 16  # frames per device in one vision-tower call


@dataclasses.dataclass
class RowFrames:
    """The vision input of one call (see the module docstring); `rows[r]` only for the rows this process packs."""

    rows: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]  # r -> pixels, rows, cols, valid [F, P]
    frames_per_row: int
    patches: int
    merge: int
    rows_per_device: int
    chunks: int
    token_rows: list[np.ndarray | None]
    patch_dim: int

    def chunk(self, block: int, chunk: int) -> tuple[np.ndarray, ...]:
        """Device block `block`'s frames of vision chunk `chunk`: pixels [FRAMES_PER_DEVICE, P, patch_dim], patch
        rows, cols and validity [FRAMES_PER_DEVICE, P]; frames of no row are zeros (all patches invalid)."""
        n, p = FRAMES_PER_DEVICE, self.patches
        out = (np.zeros((n, p, self.patch_dim), np.float32), np.zeros((n, p), np.int32), np.zeros((n, p), np.int32),
               np.zeros((n, p), bool))
        for i in range(n):
            r, f = divmod(chunk * n + i, self.frames_per_row)
            row = self.rows.get(block * self.rows_per_device + r) if r < self.rows_per_device else None
            if row is not None:
                for dst, src in zip(out, row):
                    dst[i] = src[f]
        return out


def frame_needs(layout: VisualLayout | None) -> tuple[int, int, int]:
    """(frames, most patches in a frame, merge) of one QA's visual input; zeros without one."""
    if layout is None:
        return 0, 0, 0
    merges = set(layout.merges)
    if len(merges) > 1:
        raise InputError(f"mixed merge sizes {sorted(merges)} in one stage-2 QA")
    return sum(t for t, _, _ in layout.grids), max(h * w for _, h, w in layout.grids), merges.pop()


def patches_bucket(patches: int, merge: int, min_patches: int = 0) -> int:
    p = bucket(max(patches, min_patches, 1), PATCH_BUCKETS)
    if p is None:
        raise InputError(f"frames over {PATCH_BUCKETS[-1]} patches")
    return max(p, merge * merge)


def pack_row_frames(layouts: Sequence[VisualLayout | None], pixel_values: Sequence[np.ndarray | None], *,
                    rows_per_device: int, frames_per_row: int, patches: int, merge: int,
                    patch_dim: int) -> RowFrames:
    """Rows' frames (None for a row without visual input or not packed here) in the call's common shape."""
    per_frame_out = patches // (merge * merge)
    rows, token_rows = {}, []
    for r, (layout, pixels) in enumerate(zip(layouts, pixel_values)):
        if layout is None:
            token_rows.append(None)
            continue
        pix, prow, pcol, valid, tokens = frame_arrays(np.asarray(pixels, np.float32), layout, patches,
                                                      frames=frames_per_row)
        rows[r] = (pix, prow, pcol, valid)
        starts = np.concatenate([[0], np.cumsum(tokens)[:-1]])
        frame_of = np.repeat(np.arange(len(tokens)), tokens)
        local = np.arange(sum(tokens)) - starts[frame_of]
        block_frame = (r % rows_per_device) * frames_per_row + frame_of
        token_rows.append(block_frame * per_frame_out + local)
    per_block = rows_per_device * frames_per_row
    chunks = -(-per_block // FRAMES_PER_DEVICE)
    return RowFrames(rows, frames_per_row, patches, merge, rows_per_device, chunks, token_rows, patch_dim)
