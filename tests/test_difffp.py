"""DiffFP mask (spec 6.1) against the official rule computed with real torch bf16/fp32 arithmetic, plus the
host-side placeholder dropping."""
from __future__ import annotations

import numpy as np
import pytest

from cogstream_jax.data.difffp import difffp_mask, drop_masked_placeholders
from cogstream_jax.data.image import frames_to_patches
from cogstream_jax.data.tokens import IMAGE_TOKEN_ID
from cogstream_jax.data.video import load_video
from cogstream_jax.errors import InputError
from tests.mp4s import write_test_video

torch = pytest.importorskip("torch")
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def torch_reference_mask(pixel_values, grids, merges, modals, minor, dtype, threshold=0.1, min_tokens=1):
    """The official `_get_compression_mask` rule, written out with torch tensors of the given dtype."""
    pv = torch.from_numpy(np.asarray(pixel_values, dtype=np.float32)).to(TORCH_DTYPES[dtype])
    sizes = [int(t * h * w) for t, h, w in grids]
    masks, frame_base = [], 0
    for images, (t, h, w), m, modal in zip(pv.split(sizes), grids, merges, modals):
        tokens = (h // m) * (w // m)
        if modal == "image" or t == 1:
            masks.append(torch.ones(t * tokens, dtype=torch.bool))
        else:
            images = images.view(t, tokens, -1)
            diff = torch.abs(images[1:] - images[:-1]).mean(dim=-1) * 255
            diff = torch.cat([torch.full_like(diff[0:1], threshold + 1), diff], dim=0)
            mask = diff > threshold
            mask[torch.nonzero(mask.sum(dim=1) < min_tokens)[:, 0], :min_tokens] = True
            for f in range(t):
                if frame_base + f in minor:
                    mask[f, 0] = True
                    mask[f, 1:] = False
            masks.append(mask.flatten())
        frame_base += t
    return torch.cat(masks).numpy()


def constructed_video() -> np.ndarray:
    """4 frames of 56x56 (2x2 merged tokens): random, identical, one block changed, everything changed."""
    rng = np.random.default_rng(0)
    f0 = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
    f2 = f0.copy()
    f2[0:28, 28:56] = 255 - f2[0:28, 28:56]  # token 1 (top-right block)
    f3 = (f2.astype(np.int16) + 40).clip(0, 255).astype(np.uint8)
    return np.stack([f0, f0, f2, f3])


def test_identical_dropped_changed_kept_first_whole_empty_keeps_token0():
    rows, grid = frames_to_patches(constructed_video(), (56, 56), 2)
    mask = difffp_mask(rows, [grid], [2])
    assert mask.reshape(4, 4).tolist() == [
        [True, True, True, True],  # first frame whole
        [True, False, False, False],  # identical frame: nothing survives, so token 0 is kept
        [False, True, False, False],  # only the changed block
        [True, True, True, True],  # everything changed
    ]


def test_minor_frames_keep_only_token0_with_global_frame_numbering():
    video_rows, video_grid = frames_to_patches(constructed_video(), (56, 56), 2)
    image_rows, image_grid = frames_to_patches(constructed_video()[:1], (28, 28), 1)
    single_rows, single_grid = frames_to_patches(constructed_video()[:1], (56, 56), 2)
    pixels = np.concatenate([image_rows, single_rows, video_rows])
    grids, merges = [image_grid, single_grid, video_grid], [1, 2, 2]
    # global frames: image = 0, single-frame video = 1, video frames = 2..5
    mask = difffp_mask(pixels, grids, merges, minor_frame_indices=[0, 1, 5])
    assert mask[:4].all() and mask[4:8].all()  # image and 1-frame video: untouched, minor ignored
    assert mask[8:].reshape(4, 4).tolist()[3] == [True, False, False, False]
    assert mask[8:].reshape(4, 4).tolist()[2] == [False, True, False, False]
    reference = torch_reference_mask(pixels, grids, merges, ["image", "video", "video"], {0, 1, 5}, "bfloat16")
    np.testing.assert_array_equal(mask, reference)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_real_video_matches_torch_reference(tmp_path, dtype):
    path = write_test_video(tmp_path, "static.mp4", fps=4, count=40, height=84, width=112, static_every=3)
    frames = load_video(path, fps=4, max_frames=None).frames
    rows, grid = frames_to_patches(frames, (84, 112), 2)
    mask = difffp_mask(rows, [grid], [2], minor_frame_indices=[4, 7], dtype=dtype)
    reference = torch_reference_mask(rows, [grid], [2], ["video"], {4, 7}, dtype)
    np.testing.assert_array_equal(mask, reference)
    assert 0 < mask.sum() < mask.size  # some blocks were dropped, some kept


def borderline_pixels(level: int, changed: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Two 28x56 frames (2 merged tokens) at one uint8 level; in frame 2, `changed` pixel values of the right
    block are one level higher (the left block stays identical, so the min-tokens floor never hides the
    decision about the right one)."""
    frames = np.full((2, 28, 56, 3), level, np.uint8)
    block = frames[1, :, 28:].copy().reshape(-1)
    block[:changed] += 1
    frames[1, :, 28:] = block.reshape(28, 28, 3)
    return frames_to_patches(frames, (28, 56), 2)


def test_borderline_block_where_bf16_and_fp32_disagree():
    disagreements = []
    for level in range(128, 255, 7):
        for changed in range(112, 126):
            rows, grid = borderline_pixels(level, changed)
            bf16 = difffp_mask(rows, [grid], [2], dtype="bfloat16")
            fp32 = difffp_mask(rows, [grid], [2], dtype="float32")
            np.testing.assert_array_equal(bf16, torch_reference_mask(rows, [grid], [2], ["video"], set(), "bfloat16"))
            np.testing.assert_array_equal(fp32, torch_reference_mask(rows, [grid], [2], ["video"], set(), "float32"))
            if bf16[3] != fp32[3]:
                disagreements.append((level, changed))
    assert disagreements, "expected at least one borderline block where bf16 and fp32 disagree"
    # fp32 keeps exactly when the sum of |delta| exceeds 117.6 uint8 levels: 118 changed pixels
    rows, grid = borderline_pixels(200, 118)
    assert difffp_mask(rows, [grid], [2], dtype="float32").tolist() == [True, True, False, True]
    rows, grid = borderline_pixels(200, 117)
    assert difffp_mask(rows, [grid], [2], dtype="float32").tolist() == [True, True, True, False]


def test_drop_masked_placeholders():
    ids = np.array([[1, 2, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 3, IMAGE_TOKEN_ID, 4]], np.int32)
    mask = np.array([True, False, True, False])
    out = drop_masked_placeholders(ids, mask)
    assert out.tolist() == [[1, 2, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 3, 4]] and out.dtype == np.int32
    assert drop_masked_placeholders(ids[0], np.ones(4, bool)).tolist() == ids[0].tolist()
    with pytest.raises(InputError, match="placeholders"):
        drop_masked_placeholders(ids, mask[:3])


def test_bad_shapes_rejected():
    with pytest.raises(InputError, match="pixel_values"):
        difffp_mask(np.zeros((10, 588), np.float32), [(2, 2, 2)], [2])
    with pytest.raises(InputError, match="dtype"):
        difffp_mask(np.zeros((8, 588), np.float32), [(2, 2, 2)], [2], dtype="float16")
