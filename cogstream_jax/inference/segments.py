"""Per-segment visual work shared by the two session modes: decode -> resize -> patchify -> vision tower +
projector (under the answer adapter, whose LoRA also touches the projector) and the clip's DiffFP mask.

Encoding segment by segment equals the official one-call encoding: the vision tower attends within each frame
only, and the projector is per token. `SegmentEncoder.calls` counts vision-tower runs (the fixed mode must never
re-encode a segment).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cogstream_jax.data.difffp import difffp_mask
from cogstream_jax.data.image import compute_resize
from cogstream_jax.data.processor import Processor, VisualItem
from cogstream_jax.data.video import ClipPlan, VideoProbe, plan_clip, probe_video, stream_trim_time
from cogstream_jax.inference.segment_vision import encode_segment, padded_frames
from cogstream_jax.lora import set_adapter
from cogstream_jax.model.vision import VisualLayout

VIDEO_FPS = 1
VIDEO_MAX_FRAMES = 180
_ENCODINGS = itertools.count()


def video_item(path: str | os.PathLike) -> dict:
    """The official evaluation's video content item."""
    return {"type": "video", "video": {"video_path": os.fspath(path), "fps": VIDEO_FPS, "max_frames": VIDEO_MAX_FRAMES}}


@dataclass(frozen=True)
class EncodedSegment:
    """One clip, encoded: projected features [t * tokens, D] and DiffFP keep mask [t, tokens]."""

    path: str
    timestamps: tuple[float, ...]
    grid: tuple[int, int, int]
    merge_size: int
    features: jax.Array
    clip_mask: np.ndarray
    uid: int = field(default_factory=lambda: next(_ENCODINGS))  # this encoding's identity (prefix-cache keys)

    @property
    def num_frames(self) -> int:
        return len(self.timestamps)

    @property
    def tokens_per_frame(self) -> int:
        _, h, w = self.grid
        return (h // self.merge_size) * (w // self.merge_size)


class SegmentEncoder:
    """Turns decoded clips into `EncodedSegment`s with the model's answer adapter active."""

    def __init__(self, model, processor: Processor, adapter: str | None):
        self.model, self.processor, self.adapter = model, processor, adapter
        self.calls = 0

    def encode(self, item: VisualItem, size: tuple[int, int], path: str) -> EncodedSegment:
        rows, grid = self.processor.encode_item(item, size)
        layout = VisualLayout.from_arrays([grid], [item.merge_size])
        set_adapter(self.model, self.adapter)
        graphdef, state = nnx.split(self.model)
        t, h, w = (int(g) for g in grid)
        m = item.merge_size
        out = encode_segment(graphdef, state, *(jnp.asarray(a) for a in padded_frames(rows, layout)), merge=m)
        features = out[:t, :(h // m) * (w // m)].reshape(t * (h // m) * (w // m), -1)
        self.calls += 1
        mask = difffp_mask(rows, [grid], [item.merge_size]).reshape(grid[0], -1)
        return EncodedSegment(path, tuple(item.timestamps), tuple(int(g) for g in grid), item.merge_size, features,
                              mask)

    def encode_conversation(self, conversation) -> list[EncodedSegment]:
        """The official protocol: decode every clip again and resize with the budget shared by all frames."""
        plans, probes = self.processor.plan_videos(conversation)
        items = [self.decode(plan, probe) for plan, probe in zip(plans, probes)]
        sizes = self.processor.target_sizes(items)
        return [self.encode(item, size, plan.path) for item, size, plan in zip(items, sizes, plans)]

    def decode(self, plan: ClipPlan, probe: VideoProbe) -> VisualItem:
        clip = self.processor.decode(plan, probe)
        return VisualItem("video", clip.frames, self.processor.settings.video_merge_size, list(clip.timestamps),
                          clip.frames.shape[1:3])

    def fixed_size(self, item: VisualItem, max_stream_frames: int) -> tuple[int, int]:
        """The official resize rule evaluated once, as if the stream already held `max_stream_frames` frames."""
        cfg = self.processor.settings.image
        return compute_resize(*item.size_hw, max_stream_frames, item.merge_size, patch_size=cfg.patch_size,
                              min_tokens=cfg.min_tokens, max_tokens=cfg.max_tokens)


class StreamTimeline:
    """The official continuous timeline built incrementally (same rule as `data.video.plan_stream`)."""

    def __init__(self, fps: float = VIDEO_FPS, max_frames: int | None = VIDEO_MAX_FRAMES):
        self.fps, self.max_frames = fps, max_frames
        self.total_duration = 0.0
        self.next_start = 0.0

    def plan(self, path: str | os.PathLike) -> tuple[ClipPlan, VideoProbe]:
        """The next clip's plan; the timeline moves on only at `commit`, so a clip rejected in between leaves
        no trace."""
        probe = probe_video(path)
        plan = plan_clip(probe, fps=self.fps, max_frames=self.max_frames,
                         trim_time=stream_trim_time(self.total_duration), time_offset=self.next_start)
        return plan, probe

    def commit(self, plan: ClipPlan, probe: VideoProbe) -> None:
        self.total_duration += probe.duration
        self.next_start = plan.timestamps[-1] + 1


def row_keys(segments: list[EncodedSegment]) -> list[tuple[int, int]]:
    """The provenance of every row of the concatenated features: (encoding uid, row in that segment)."""
    return [(s.uid, row) for s in segments for row in range(s.num_frames * s.tokens_per_frame)]


def frame_rows(segments: list[EncodedSegment]) -> np.ndarray:
    """[total frames + 1] start row of every frame in the concatenated features (all frames share P here)."""
    counts = [s.tokens_per_frame for s in segments for _ in range(s.num_frames)]
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
