"""The segment encoder's device program: a clip's frames, padded into a (frames, patches) bucket, through the
vision tower and projector. Apart from `segments` (which decodes video) so that compile-check builds it on hosts
without PyAV."""
from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from cogstream_jax.model.frame_vision import PATCH_BUCKETS, bucket, encode_frames, frame_arrays
from cogstream_jax.model.vision import VisualLayout

#: frames per encoded segment are padded to one of these (patches per frame to `frame_vision.PATCH_BUCKETS`),
#: so the faithful resize, which re-encodes every clip at a new grid as the stream grows, reuses a few programs
FRAME_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)


@functools.partial(jax.jit, static_argnames=("graphdef", "merge"))
def encode_segment(graphdef, state, pixels, rows, cols, valid, *, merge):
    """Padded frames [F, P, 588] -> projected features [F, P / merge^2, hidden] (the same buckets as training)."""
    model = nnx.merge(graphdef, state)
    feats = encode_frames(model.vision_encoder, pixels, rows, cols, valid, merge, impl=model.attn_impl,
                          mesh=model.attn_mesh, interpret=model.attn_interpret, dtype=model.dtype,
                          scan=model.scan_layers)
    return model.mm_projector(feats)


def padded_frames(rows: np.ndarray, layout: VisualLayout):
    """A clip's packed patch rows -> (pixels, rows, cols, valid) in its (frames, patches) bucket."""
    (t, h, w), = layout.grids
    frames = bucket(t, FRAME_BUCKETS) or t
    patches = bucket(h * w, PATCH_BUCKETS) or h * w
    pix, prow, pcol, valid, _ = frame_arrays(np.asarray(rows, np.float32), layout, patches, frames)
    return pix, prow, pcol, valid
