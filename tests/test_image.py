"""Resize rule, pixel pipeline and patchify against the spec's numbers and a plain numpy + PIL oracle."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cogstream_jax.data.image import (
    compute_mixed_resize,
    compute_resize,
    frames_to_patches,
    patchify,
    preprocess_frames,
    value_table,
)
from cogstream_jax.data.video import load_video
from cogstream_jax.errors import InputError
from tests.mp4s import write_test_video
from tests.spec_oracle import naive_patchify, naive_pixels, naive_resize


@pytest.mark.parametrize("frames,expected", [(2, (364, 644)), (60, (336, 616)), (180, (196, 336))])
def test_spec_resize_numbers_360x640(frames, expected):
    assert compute_resize(360, 640, frames, 2) == expected


def test_resize_other_spec_numbers():
    assert compute_resize(720, 1280, 60, 2) == (336, 616)
    assert compute_resize(56, 84, 2, 2) == (112, 140)  # min-pixels clamp: 20 tokens per frame
    h, w = compute_resize(196, 336, 180, 2)
    assert (h // 28) * (w // 28) == 84
    # images: factor 14, budget 16384 patches; W500xH300 as an array -> grid 21x36
    assert compute_resize(300, 500, 1, 1) == (294, 504)
    with pytest.raises(InputError, match="compute_resize"):
        compute_resize(0, 10, 1, 2)


def test_mixed_resize_follows_global_budget():
    # small: rounding only; large: one beta for all items from the global token count
    assert compute_mixed_resize([(1, 300, 500, 1), (2, 360, 640, 2)]) == [(294, 504), (364, 644)]
    items = [(1, 1000, 1000, 1), (100, 360, 640, 2)]
    total = math.ceil(1000 / 14) ** 2 + 100 * math.ceil(360 / 28) * math.ceil(640 / 28)
    beta = math.sqrt(total / 16384)
    expected = [(math.floor(1000 / beta / 14) * 14,) * 2,
                (math.floor(360 / beta / 28) * 28, math.floor(640 / beta / 28) * 28)]
    assert compute_mixed_resize(items) == expected


def test_value_table_matches_official_dtypes():
    levels = np.arange(256, dtype=np.uint8)
    expected = ((levels * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    table = value_table()
    assert table.dtype == np.float32
    np.testing.assert_array_equal(table[0], expected)
    assert table[0][0] == -1.0 and table[0][255] == 1.0


@pytest.fixture(scope="module")
def odd_clips(tmp_path_factory):
    """Decoded frames of real MP4s with sizes that are not multiples of 14/28, landscape and portrait."""
    root = tmp_path_factory.mktemp("image_clips")
    shapes = {"landscape": (90, 158), "portrait": (158, 90), "tiny": (32, 48)}
    return {name: load_video(write_test_video(root, f"{name}.mp4", fps=10, count=31, height=h, width=w, seed=i)).frames
            for i, (name, (h, w)) in enumerate(shapes.items())}


@pytest.mark.parametrize("name", ["landscape", "portrait", "tiny"])
@pytest.mark.parametrize("merge", [1, 2])
def test_pixels_equal_naive_pipeline_exactly(odd_clips, name, merge):
    frames = odd_clips[name]
    size = compute_resize(*frames.shape[1:3], len(frames), merge)
    assert size == naive_resize(*frames.shape[1:3], len(frames), merge)
    expected = naive_patchify(naive_pixels(frames, size), merge)
    pixels = preprocess_frames(frames, size)
    rows, grid = patchify(pixels, merge)
    assert grid == (len(frames), size[0] // 14, size[1] // 14)
    np.testing.assert_array_equal(rows, expected)
    fused, fused_grid = frames_to_patches(frames, size, merge)
    assert fused_grid == grid and fused.dtype == np.float32
    np.testing.assert_array_equal(fused, expected)
    for threads in (2, 4, 64):  # more threads than frames too
        threaded, threaded_grid = frames_to_patches(frames, size, merge, threads=threads)
        assert threaded_grid == grid
        np.testing.assert_array_equal(threaded, expected)


def test_patchify_layout_is_block_major():
    t, h, w, m = 2, 56, 84, 2
    coords = np.zeros((t, 3, h, w), np.float32)
    coords[:, 0] = np.arange(h)[:, None] // 14  # patch row
    coords[:, 1] = np.arange(w)[None, :] // 14  # patch column
    coords[:, 2] = np.arange(t)[:, None, None]  # frame
    rows, grid = patchify(coords, m)
    assert grid == (2, 4, 6) and rows.shape == (48, 588)
    order = [(int(r[2 * 196]), int(r[0]), int(r[196])) for r in rows]
    assert order[:8] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 0, 2), (0, 0, 3), (0, 1, 2), (0, 1, 3)]
    assert order[24] == (1, 0, 0)
    with pytest.raises(InputError, match="multiple"):
        patchify(np.zeros((1, 3, 42, 56), np.float32), 2)


def test_bad_frames_rejected():
    with pytest.raises(InputError, match="uint8"):
        preprocess_frames(np.zeros((2, 8, 8, 3), np.float32), (28, 28))
