"""Which source frames the official FFmpeg pipeline keeps (`trim` -> `setpts` -> `fps=1:round=up`), as pure
integer arithmetic on presentation timestamps, plus the official timestamp and `max_frames` rules (spec 4.1).

No decoding happens here: `video.py` demuxes the packet timestamps, asks this module which frames survive and
then decodes only those. `tests/test_video.py` checks the selection against PyAV's real FFmpeg filter graph.
"""
from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction
from typing import Sequence

import numpy as np

AV_TIME_BASE = 1_000_000


def _ceil(x: Fraction) -> int:
    return -((-x.numerator) // x.denominator)


def _round_half_away(x: Fraction) -> int:
    """`av_rescale_q` rounding (AV_ROUND_NEAR_INF)."""
    return int(math.copysign(math.floor(abs(x) + Fraction(1, 2)), x))


def option_microseconds(seconds: float) -> int:
    """A float passed to an FFmpeg duration option the way ffmpeg-python does it (`str(value)`), parsed by
    `av_parse_time`: decimal digits beyond microseconds are cut off, not rounded."""
    text = format(Decimal(repr(float(seconds))), "f")
    whole, _, frac = text.partition(".")
    sign = -1 if whole.startswith("-") else 1
    micro = abs(int(whole)) * AV_TIME_BASE + int((frac + "000000")[:6])
    return sign * micro


def seconds_to_pts(microseconds: int, time_base: Fraction) -> int:
    """`av_rescale_q(us, AV_TIME_BASE_Q, time_base)`."""
    return _round_half_away(Fraction(microseconds, AV_TIME_BASE) / time_base)


def trim_window(trim_time: float, duration: float) -> tuple[float, float]:
    """The official `trim(start=trim_time, end=floor(duration - trim_time) + trim_time)` bounds in seconds."""
    return trim_time, math.floor(duration - trim_time) + trim_time


def apply_trim(pts: Sequence[int], eof_pts: int, time_base: Fraction, start: float, end: float
               ) -> tuple[list[int], list[int], int]:
    """FFmpeg `trim=start:end` then `setpts=PTS-STARTPTS`.

    Returns (kept source indices, their shifted pts, shifted end-of-stream pts). Frames are kept while
    `start_pts <= pts < end_pts`; the stream ends at the first frame at or after `end_pts` (or at the input's
    end if none), and `setpts` shifts everything by the first kept frame's pts.
    """
    start_pts = seconds_to_pts(option_microseconds(start), time_base)
    end_pts = seconds_to_pts(option_microseconds(end), time_base)
    kept: list[int] = []
    stream_end = eof_pts
    for index, value in enumerate(pts):
        if value >= end_pts:
            stream_end = value
            break
        if value >= start_pts:
            kept.append(index)
    if not kept:
        return [], [], 0
    first = pts[kept[0]]
    return kept, [pts[k] - first for k in kept], stream_end - first


def apply_fps_filter(pts: Sequence[int], eof_pts: int, time_base: Fraction, fps: Fraction) -> list[int]:
    """FFmpeg `fps=fps:round=up`: output tick n (from the first frame's tick up to the rounded end of stream)
    shows the latest input frame whose pts, rounded up to the output time base, is <= n."""
    if not len(pts):
        return []
    scale = time_base * fps
    ticks = [_ceil(p * scale) for p in pts]
    end_tick = _ceil(eof_pts * scale)
    chosen: list[int] = []
    current = 0
    for tick in range(ticks[0], end_tick):
        while current + 1 < len(ticks) and ticks[current + 1] <= tick:
            current += 1
        chosen.append(current)
    return chosen


def official_timestamps(start_time: float, duration: float, fps: float, count: int) -> list[float]:
    """`np.arange(start_time, start_time + duration + 1/fps, 1/fps)[:count]` (float64, as the official code)."""
    values = np.arange(start_time, start_time + duration + 1 / fps, 1 / fps)[:count]
    return [float(v) for v in values]


def subsample_indices(count: int, max_frames: int | None) -> list[int]:
    """`np.linspace(0, count - 1, max_frames, dtype=int)` when there are more than `max_frames` frames."""
    if max_frames is None or count <= max_frames:
        return list(range(count))
    return [int(i) for i in np.linspace(0, count - 1, max_frames, dtype=int)]


def fps_selection(pts: Sequence[int], eof_pts: int, time_base: Fraction, *, duration: float, fps: float = 1,
                  trim_time: float = 0.0) -> list[int]:
    """Source frame indices (presentation order, repeats possible) that the official FFmpeg graph outputs,
    before the `max_frames` subsampling.

    `pts` are the frames' presentation timestamps in `time_base` units, sorted, already offset so that the file
    starts at 0 (the official `-ss 0`); `eof_pts` is the end of the last frame; `duration` the container
    duration in seconds (ffprobe `format.duration`), which the official trim window is computed from.
    """
    rate = Fraction(fps).limit_denominator(1_000_000)
    source = list(range(len(pts)))
    shifted, end = list(pts), eof_pts
    if trim_time > 0:
        start, stop = trim_window(trim_time, duration)
        source, shifted, end = apply_trim(pts, eof_pts, time_base, start, stop)
    return [source[k] for k in apply_fps_filter(shifted, end, time_base, rate)]


def select_frame_indices(
    pts: Sequence[int],
    eof_pts: int,
    time_base: Fraction,
    *,
    duration: float,
    fps: float = 1,
    trim_time: float = 0.0,
    max_frames: int | None = 180,
) -> list[int]:
    """Source frame indices the official loader returns: `fps_selection` then the linspace subsampling."""
    picked = fps_selection(pts, eof_pts, time_base, duration=duration, fps=fps, trim_time=trim_time)
    return [picked[k] for k in subsample_indices(len(picked), max_frames)]
