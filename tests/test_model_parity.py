"""Numerical parity of our Flax VideoLLaMA3 with transformers' VideoLlama3ForConditionalGeneration (fp32, CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_reference import IMAGE_ID, VIDEO_ID, random_pixels, reference_pair, torch_logits

LOGIT_TOL = 1e-4


def _ids(*parts) -> np.ndarray:
    out = []
    for p in parts:
        out.extend(p if isinstance(p, list) else [p])
    return np.asarray([out], np.int64)


def _check(ours, ref, tol=LOGIT_TOL):
    ours = np.asarray(ours)
    assert ours.shape == ref.shape
    diff = np.abs(ours - ref).max()
    assert diff <= tol, f"max |Δ logits| = {diff:.3g}"


def test_image_only():
    tm, jm = reference_pair()
    pix = random_pixels(24, 1)  # grid (1, 4, 6), merge 1 -> 24 tokens
    ids = _ids(1, 2, 3, [IMAGE_ID] * 24, 4, 5)
    ref = torch_logits(tm, input_ids=ids, pixel_values=pix, image_grid_thw=[[1, 4, 6]], image_merge_sizes=[1])
    _check(jm(ids, pix, [[1, 4, 6]], [1]).logits, ref)


def test_one_video():
    tm, jm = reference_pair()
    pix = random_pixels(96, 2)  # grid (4, 4, 6), merge 2 -> 24 tokens
    ids = _ids(1, 2, [VIDEO_ID] * 24, 4)
    ref = torch_logits(tm, input_ids=ids, pixel_values_videos=pix, video_grid_thw=[[4, 4, 6]], video_merge_sizes=[2])
    _check(jm(ids, pix, [[4, 4, 6]], [2]).logits, ref)


def test_two_videos_of_different_resolutions():
    tm, jm = reference_pair()
    grids = [[3, 4, 6], [2, 6, 4]]  # 72 + 48 patches -> 18 + 12 tokens
    pix = random_pixels(120, 3)
    ids = _ids(7, [VIDEO_ID] * 18, 8, 9, [VIDEO_ID] * 12, 10)
    ref = torch_logits(tm, input_ids=ids, pixel_values_videos=pix, video_grid_thw=grids, video_merge_sizes=[2, 2])
    _check(jm(ids, pix, grids, [2, 2]).logits, ref)


def test_image_and_video_in_one_request():
    tm, jm = reference_pair()
    img, vid = random_pixels(24, 4), random_pixels(96, 5)
    ids = _ids(1, [IMAGE_ID] * 24, 2, 3, [VIDEO_ID] * 24, 4)
    ref = torch_logits(tm, input_ids=ids, pixel_values=img, image_grid_thw=[[1, 4, 6]], image_merge_sizes=[1],
                       pixel_values_videos=vid, video_grid_thw=[[4, 4, 6]], video_merge_sizes=[2])
    ours = jm(ids, np.concatenate([img, vid]), [[1, 4, 6], [4, 4, 6]], [1, 2]).logits
    _check(ours, ref)


def test_compression_mask():
    tm, jm = reference_pair()
    pix = random_pixels(96, 6)
    mask = np.ones(24, bool)
    mask[[6, 7, 13, 20]] = False
    ids = _ids(1, 2, [VIDEO_ID] * 20, 4)
    ref = torch_logits(tm, input_ids=ids, pixel_values_videos=pix, video_grid_thw=[[4, 4, 6]], video_merge_sizes=[2],
                       video_compression_mask=mask)
    _check(jm(ids, pix, [[4, 4, 6]], [2], compression_mask=mask).logits, ref)


@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (4, 4), (8, 2)])
def test_gqa_ratios(heads, kv_heads):
    tm, jm = reference_pair(kv_heads=kv_heads, heads=heads)
    pix = random_pixels(96, 7)
    ids = _ids(3, [VIDEO_ID] * 24, 5, 6, 7)
    ref = torch_logits(tm, input_ids=ids, pixel_values_videos=pix, video_grid_thw=[[4, 4, 6]], video_merge_sizes=[2])
    _check(jm(ids, pix, [[4, 4, 6]], [2]).logits, ref)


def test_text_batch_with_left_padding():
    tm, jm = reference_pair()
    ids = np.asarray([[0, 0, 0, 11, 12, 13, 14], [21, 22, 23, 24, 25, 26, 27]])
    mask = np.asarray([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    pos = np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)
    ref = torch_logits(tm, input_ids=ids, attention_mask=mask, position_ids=pos)
    ours = np.asarray(jm(ids, attention_mask=mask, positions=pos).logits)
    # padded query rows attend to nothing real in either implementation: compare real tokens only
    _check(ours[mask.astype(bool)], ref[mask.astype(bool)])
    # default positions are arange, as in transformers' forward
    _check(jm(ids, attention_mask=mask).logits[1], torch_logits(tm, input_ids=ids, attention_mask=mask)[1])


def test_components_match_tightly():
    tm, jm = reference_pair()
    pix = random_pixels(96, 8)
    with torch.no_grad():
        t_vis = tm.model.vision_model(pixel_values=torch.as_tensor(pix), grid_thw=torch.tensor([[4, 4, 6]]),
                                      merge_sizes=torch.tensor([2])).last_hidden_state.numpy()
        t_proj = tm.model.projector(torch.as_tensor(t_vis)).numpy()
    from cogstream_jax.model.vision import VisualLayout

    layout = VisualLayout.from_arrays([[4, 4, 6]], [2])
    j_vis = np.asarray(jm.vision_encoder(pix, layout))
    assert np.abs(j_vis - t_vis).max() < 2e-5
    assert np.abs(np.asarray(jm.mm_projector(t_vis)) - t_proj).max() < 1e-5

    ids = _ids(1, 2, [VIDEO_ID] * 24, 4)
    with torch.no_grad():
        t_hidden = tm.model(input_ids=torch.as_tensor(ids), pixel_values_videos=torch.as_tensor(pix),
                            video_grid_thw=torch.tensor([[4, 4, 6]]), video_merge_sizes=torch.tensor([2]))
        t_hidden = t_hidden.last_hidden_state.numpy()
    ours = jm(ids, pix, [[4, 4, 6]], [2], return_hidden=True)
    assert np.abs(np.asarray(ours.hidden_states) - t_hidden).max() < 2e-5
