"""Video decoding the way the official CogReasoner processor does it (spec videollama3.md 4.1), decoding only
the frames that are kept.

The official loader pipes each clip through FFmpeg (`-ss 0`, optional `trim` + `setpts`, `fps=1:round=up`,
rgb24) and then subsamples to `max_frames` by linspace. Here the packet timestamps are demuxed first (no
decoding), `frame_selection` computes which frames that graph would output, and `frame_decoder` has PyAV
(the same libavcodec decoder) decode just those: unneeded H.264 non-reference pictures are skipped and
unneeded stretches are jumped over by seeking to IDR pictures.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import av
import numpy as np

from cogstream_jax import remote
from cogstream_jax.data.frame_selection import (
    AV_TIME_BASE,
    fps_selection,
    official_timestamps,
    seconds_to_pts,
    subsample_indices,
)
from cogstream_jax.data.frame_decoder import DecodeIndex, decode_frames, is_idr, nal_length_size
from cogstream_jax.errors import VideoError

DECODERS = ("pyav", "decord")


@dataclass(frozen=True)
class VideoProbe:
    """What the official `ffmpeg.probe` call and FFmpeg's timestamps give for one file."""

    path: str
    duration: float  # format duration in seconds (ffprobe `format.duration`)
    start_time: float  # video stream start time in seconds (ffprobe `streams[].start_time`)
    width: int
    height: int
    time_base: Fraction
    pts: tuple[int, ...]  # presentation timestamps, sorted, shifted so the file starts at 0 (`-ss 0`)
    eof_pts: int  # end of the last frame (its pts + duration)
    raw_pts: tuple[int, ...]  # the same timestamps as stored in the file, to match decoded frames
    decode_index: DecodeIndex | None = None  # decode order and IDR seek points (H.264 in MP4)


@dataclass(frozen=True)
class ClipPlan:
    """Which frames of one file the official loader keeps and their timestamps (no pixels yet)."""

    path: str
    trim_time: float
    frame_indices: tuple[int, ...]  # source frames in presentation order (repeats possible)
    timestamps: tuple[float, ...]  # on the global timeline when built by `plan_stream`
    duration: float


@dataclass(frozen=True)
class VideoClip:
    """Decoded frames of one clip: uint8 [T, H, W, 3] plus the plan they came from."""

    path: str
    frames: np.ndarray
    timestamps: list[float]
    frame_indices: list[int]
    duration: float
    trim_time: float = 0.0

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def _open(path: str):
    if not remote.isfile(path):
        raise VideoError(f"{path}: video file does not exist")
    if remote.getsize(path) == 0:
        raise VideoError(f"{path}: video file is empty (0 bytes)")
    try:
        return av.open(remote.local_file(path))
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(f"{path}: cannot be read as a video ({exc.__class__.__name__}: {exc})") from None


def _video_stream(container, path: str):
    if not container.streams.video:
        raise VideoError(f"{path}: no video stream in the file")
    return container.streams.video[0]


def probe_video(path: str | os.PathLike) -> VideoProbe:
    """Demux (without decoding) the timestamps and the header fields the official loader uses."""
    path = os.fspath(path)
    with _open(path) as container:
        stream = _video_stream(container, path)
        time_base = Fraction(stream.time_base)
        packets: list[tuple[int, int]] = []
        decode_pts: list[int] = []
        idr_positions: list[int] = []
        idr_pts: list[int] = []
        length_size = nal_length_size(stream.codec_context.extradata) if stream.codec_context.name == "h264" else None
        try:
            for packet in container.demux(stream):
                if packet.size and packet.pts is not None:
                    if not packet.is_discard:  # edit-list pre-roll: decoded as a reference, never output
                        packets.append((int(packet.pts), int(packet.duration or 0)))
                    if length_size and packet.is_keyframe and is_idr(bytes(packet), length_size):
                        idr_positions.append(len(decode_pts))
                        idr_pts.append(int(packet.pts))
                    decode_pts.append(int(packet.pts))
        except av.error.FFmpegError as exc:
            raise VideoError(f"{path}: the video stream is corrupt ({exc})") from None
        if not packets:
            raise VideoError(f"{path}: the video stream has 0 frames")
        packets.sort()
        raw = tuple(p for p, _ in packets)
        last_duration = packets[-1][1]
        if last_duration <= 0:
            rate = stream.average_rate or stream.guessed_rate
            last_duration = int(round(1 / (Fraction(rate) * time_base))) if rate else 1
        file_start = container.start_time or 0
        offset = seconds_to_pts(int(file_start), time_base)
        duration_us = container.duration
        duration = duration_us / AV_TIME_BASE if duration_us else float((raw[-1] + last_duration) * time_base)
        start_time = float(f"{float(stream.start_time * time_base):f}") if stream.start_time is not None else 0.0
        return VideoProbe(
            path=path,
            duration=duration,
            start_time=start_time,
            width=int(stream.codec_context.width),
            height=int(stream.codec_context.height),
            time_base=time_base,
            pts=tuple(p - offset for p in raw),
            eof_pts=raw[-1] + last_duration - offset,
            raw_pts=raw,
            decode_index=DecodeIndex(tuple(decode_pts), tuple(idr_positions), tuple(idr_pts)),
        )


def plan_clip(probe: VideoProbe, *, fps: float = 1, max_frames: int | None = 180, trim_time: float = 0.0,
              time_offset: float = 0.0) -> ClipPlan:
    """Frame choice and timestamps of the official `load_video` (fps filter, arange timestamps, linspace)."""
    picked = fps_selection(probe.pts, probe.eof_pts, probe.time_base, duration=probe.duration, fps=fps,
                           trim_time=trim_time)
    stamps = official_timestamps(probe.start_time, probe.duration, fps, len(picked))
    picked = picked[: len(stamps)]  # the official zip(images, timestamps) stops at the shorter list
    if not picked:
        where = f" after trimming {trim_time:g}s" if trim_time > 0 else ""
        raise VideoError(f"{probe.path}: no frames are left{where} (duration {probe.duration:g}s)")
    keep = subsample_indices(len(picked), max_frames)
    return ClipPlan(
        path=probe.path,
        trim_time=trim_time,
        frame_indices=tuple(picked[k] for k in keep),
        timestamps=tuple(stamps[k] + time_offset for k in keep),
        duration=probe.duration,
    )


def _decode_decord(probe: VideoProbe, wanted: Sequence[int], threads: int = 1) -> dict[int, np.ndarray]:
    try:
        import decord
    except ImportError:  # pragma: no cover - decord is a pinned dependency
        raise VideoError(f"{probe.path}: decoder 'decord' requested but decord is not installed") from None
    try:
        reader = decord.VideoReader(remote.local_file(probe.path), ctx=decord.cpu(0), num_threads=threads)
        if len(reader) != len(probe.pts):
            raise VideoError(f"{probe.path}: decord counts {len(reader)} frames, the demuxer {len(probe.pts)}")
        batch = reader.get_batch(list(wanted)).asnumpy()
    except decord.DECORDError as exc:
        raise VideoError(f"{probe.path}: decord cannot decode the file ({exc})") from None
    return dict(zip(wanted, batch))


def decode_plan(plan: ClipPlan, probe: VideoProbe | None = None, *, decoder: str = "pyav", threads: int = 1
                ) -> VideoClip:
    """Decode only the planned frames (each distinct source frame once) into uint8 [T, H, W, 3]; `threads`
    decoders share the work (PyAV only), with the same pixels for any count."""
    if decoder not in DECODERS:
        raise VideoError(f"{plan.path}: unknown decoder {decoder!r} (choose from {', '.join(DECODERS)})")
    probe = probe or probe_video(plan.path)
    wanted = sorted(set(plan.frame_indices))
    if decoder == "pyav":
        try:
            decoded = decode_frames(probe.path, probe.raw_pts, wanted, probe.decode_index, threads=threads)
            if any(i not in decoded for i in wanted):
                # a decoder that guesses its reorder depth could treat the shortcuts' gaps differently: redo
                # the plain full decode before calling anything missing
                decoded = decode_frames(probe.path, probe.raw_pts, wanted, None, skip_disposable=False)
        except av.error.FFmpegError as exc:
            raise VideoError(f"{plan.path}: decoding failed ({exc})") from None
    else:
        decoded = _decode_decord(probe, wanted, threads)
    missing = [i for i in wanted if i not in decoded]
    if missing:
        raise VideoError(f"{plan.path}: the decoder output no picture for frames {missing[:5]} (a truncated or "
                         f"corrupt file, or a stream that does not start with a keyframe)")
    frames = np.stack([decoded[i] for i in plan.frame_indices]).astype(np.uint8, copy=False)
    return VideoClip(path=plan.path, frames=frames, timestamps=list(plan.timestamps),
                     frame_indices=list(plan.frame_indices), duration=plan.duration, trim_time=plan.trim_time)


def load_video(path: str | os.PathLike, fps: float = 1, max_frames: int | None = 180, trim_time: float = 0.0,
               *, decoder: str = "pyav", threads: int = 1) -> VideoClip:
    """One clip exactly as the official `load_video(..., trim_time=)`: local timestamps 0, 1/fps, ..."""
    probe = probe_video(path)
    return decode_plan(plan_clip(probe, fps=fps, max_frames=max_frames, trim_time=trim_time), probe,
                       decoder=decoder, threads=threads)


def stream_trim_time(total_duration: float, *, fix_trim: bool = False) -> float:
    """The official `trim_time = 1 - frac(total_duration so far)` (frac taken as 1 before the first clip).

    Faithful quirk: an integer cumulative duration gives frac 0 and so drops the first second of the next
    clip; `fix_trim=True` trims nothing in that case.
    """
    fractional, _ = math.modf(total_duration)
    if total_duration == 0 or (fix_trim and fractional == 0):
        fractional = 1
    return 1 - fractional


def _per_clip(value, count: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise VideoError(f"{name}: {len(value)} values for {count} video clips")
        return list(value)
    return [value] * count


def plan_stream(paths: Sequence[str | os.PathLike], fps: float | Sequence[float] = 1,
                max_frames: int | None | Sequence[int | None] = 180, fix_trim: bool = False
                ) -> tuple[list[ClipPlan], list[VideoProbe]]:
    """Plans for the clips of one stream on the official continuous timeline (spec 4.1): clip k is trimmed
    by `stream_trim_time` and shifted to start one second after clip k-1's last timestamp. `fps` and
    `max_frames` may be given per clip."""
    fps_list = _per_clip(fps, len(paths), "fps")
    max_list = _per_clip(max_frames, len(paths), "max_frames")
    plans: list[ClipPlan] = []
    probes: list[VideoProbe] = []
    total_duration = 0.0
    seg_time_end = 0.0
    for path, clip_fps, clip_max in zip(paths, fps_list, max_list):
        probe = probe_video(path)
        trim = stream_trim_time(total_duration, fix_trim=fix_trim)
        plan = plan_clip(probe, fps=clip_fps, max_frames=clip_max, trim_time=trim, time_offset=seg_time_end)
        total_duration += probe.duration
        seg_time_end = plan.timestamps[-1] + 1
        plans.append(plan)
        probes.append(probe)
    return plans, probes


def load_stream(paths: Sequence[str | os.PathLike], fps: float = 1, max_frames: int | None = 180,
                fix_trim: bool = False, *, decoder: str = "pyav", threads: int = 1) -> list[VideoClip]:
    """All clips of one stream, decoded, with timestamps on one global timeline."""
    plans, probes = plan_stream(paths, fps=fps, max_frames=max_frames, fix_trim=fix_trim)
    return [decode_plan(plan, probe, decoder=decoder, threads=threads) for plan, probe in zip(plans, probes)]
