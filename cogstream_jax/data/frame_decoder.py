"""Decode a chosen set of frames of one file with PyAV, doing as little decoding as exactness allows.

Three savings, none of which changes a single decoded pixel:
* only the wanted frames are converted to RGB;
* H.264 non-reference pictures (nal_ref_idc 0) that are not wanted are never sent to the decoder (no other
  picture predicts from them);
* when a whole stretch between two wanted frames contains an IDR picture, the demuxer seeks straight to that
  IDR (an IDR empties the reference list, so decoding can restart there). Packets before the IDR are dropped
  if the seek lands early; if it lands after the IDR, the decoder falls back to a plain sequential pass.

The IDR seek points also cut the work into independent runs, so `threads > 1` decodes groups of runs of
near-equal length on separate threads, each with its own demuxer and decoder (libavcodec releases the GIL).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import av
import numpy as np

from cogstream_jax import remote
from cogstream_jax.data.threads import balanced_groups, thread_map

H264_IDR, H264_NON_IDR = 5, 1


@dataclass(frozen=True)
class DecodeIndex:
    """Per-file facts the decoder needs, gathered while demuxing in `probe_video`."""

    decode_pts: tuple[int, ...]  # packet pts in decode (file) order
    idr_positions: tuple[int, ...]  # positions (in decode order) of H.264 IDR packets; empty if unknown
    idr_pts: tuple[int, ...]  # their pts, used as seek targets


@dataclass
class DecodeStats:
    packets_sent: int = 0
    seeks: int = 0
    groups: int = 0  # runs decoded independently (one per thread)

    def add(self, other: "DecodeStats") -> None:
        self.packets_sent += other.packets_sent
        self.seeks += other.seeks
        self.groups += other.groups


def nal_length_size(extradata: bytes | None) -> int | None:
    """NAL length prefix size of AVCC (MP4) H.264, or None when the stream is not AVCC."""
    if not extradata or len(extradata) < 5 or extradata[0] != 1:
        return None
    return (extradata[4] & 3) + 1


def first_slice_header(packet_bytes: bytes, length_size: int) -> int | None:
    """NAL header byte of the packet's first coded slice, or None."""
    pos = 0
    while pos + length_size < len(packet_bytes):
        size = int.from_bytes(packet_bytes[pos:pos + length_size], "big")
        header = packet_bytes[pos + length_size]
        if header & 0x1F in (H264_NON_IDR, H264_IDR):
            return header
        pos += length_size + size
    return None


def is_disposable(packet_bytes: bytes, length_size: int) -> bool:
    """True for an H.264 non-reference picture (nal_ref_idc == 0)."""
    header = first_slice_header(packet_bytes, length_size)
    return header is not None and (header >> 5) & 3 == 0


def is_idr(packet_bytes: bytes, length_size: int) -> bool:
    header = first_slice_header(packet_bytes, length_size)
    return header is not None and header & 0x1F == H264_IDR


Run = tuple[int | None, set[int]]  # (decode position to seek to, or None to go on; target pts of the run)


def _runs(index: DecodeIndex, target_pts: Sequence[int]) -> list[Run]:
    """Group the targets into decoding runs, each starting at an IDR that the previous run does not reach."""
    position = {pts: k for k, pts in enumerate(index.decode_pts)}
    runs: list[Run] = []
    last_end = -1
    for pts in sorted(target_pts, key=position.__getitem__):
        where = position[pts]
        slot = bisect.bisect_right(index.idr_positions, where) - 1
        idr = index.idr_positions[slot] if slot >= 0 else None
        if runs and (idr is None or idr <= last_end + 1):
            runs[-1][1].add(pts)
        else:
            runs.append((idr if idr is not None and idr > last_end + 1 else None, {pts}))
        last_end = max(last_end, where)
    return runs


def _run_costs(index: DecodeIndex, runs: Sequence[Run]) -> list[int]:
    """Packets each run reads: from its start (seek point, or the file start) to its last target."""
    position = {pts: k for k, pts in enumerate(index.decode_pts)}
    return [max(position[p] for p in targets) - (start or 0) + 1 for start, targets in runs]


class _LandedLate(Exception):
    """A seek went past the IDR it aimed at."""


def _decode_runs(path: str, index: DecodeIndex, targets: dict[int, int], runs: Sequence[Run], stats: DecodeStats,
                 skip_disposable: bool = True) -> dict[int, np.ndarray]:
    frames: dict[int, np.ndarray] = {}
    seek_pts = dict(zip(index.idr_positions, index.idr_pts))
    position = {pts: k for k, pts in enumerate(index.decode_pts)}
    with av.open(remote.local_file(path)) as container:
        stream = container.streams.video[0]
        codec = stream.codec_context
        length_size = nal_length_size(codec.extradata) if codec.name == "h264" and skip_disposable else None

        pending: set[int] = set()

        def collect(decoded) -> None:
            for frame in decoded:
                index_ = targets.get(frame.pts)
                if index_ is not None and index_ not in frames:
                    frames[index_] = frame.to_ndarray(format="rgb24")
                pending.discard(frame.pts)

        packets, check_landing = None, False
        for seek_position, run_targets in runs:
            pending.clear()
            pending.update(pts for pts in run_targets if targets[pts] not in frames)
            if seek_position is not None:
                if packets is not None:
                    try:
                        collect(codec.decode(None))  # drain frames still held back for reordering
                    except av.error.EOFError:
                        pass
                container.seek(seek_pts[seek_position], stream=stream, backward=True, any_frame=False)
                codec.flush_buffers()
                packets, check_landing = None, True
                stats.seeks += 1
            if packets is None:
                packets = container.demux(stream)
            for packet in packets:
                if check_landing and packet.pts is not None:
                    landed = position.get(packet.pts, len(position))
                    if landed > seek_position:
                        raise _LandedLate
                    if landed < seek_position:
                        continue  # landed on an earlier keyframe: nothing before the IDR is needed
                    check_landing = False
                if (length_size and packet.size and packet.pts not in targets
                        and is_disposable(bytes(packet), length_size)):
                    continue
                stats.packets_sent += 1
                collect(codec.decode(packet))
                if not pending:
                    break
    return frames


def _decode_group(path: str, index: DecodeIndex, targets: dict[int, int], runs: Sequence[Run],
                  skip_disposable: bool) -> tuple[dict[int, np.ndarray], DecodeStats]:
    """Decode one group of runs with its own demuxer; a seek that lands late means one sequential pass."""
    stats = DecodeStats(groups=1)
    try:
        return _decode_runs(path, index, targets, runs, stats, skip_disposable), stats
    except _LandedLate:
        wanted = {pts for _, run_targets in runs for pts in run_targets}
        return _decode_runs(path, index, targets, [(None, wanted)], stats, skip_disposable), stats


def decode_frames(path: str, raw_pts: Sequence[int], wanted: Sequence[int], index: DecodeIndex | None = None,
                  stats: DecodeStats | None = None, threads: int = 1, skip_disposable: bool = True
                  ) -> dict[int, np.ndarray]:
    """RGB uint8 [H, W, 3] of each wanted frame (indices into presentation order `raw_pts`).

    The pixels do not depend on `threads`: each frame is decoded from the same IDR picture either way.
    `index=None, skip_disposable=False` is the plain decode of every packet, as FFmpeg itself runs it.
    """
    targets = {raw_pts[i]: i for i in wanted}
    stats = stats if stats is not None else DecodeStats()
    if index is not None and index.idr_positions:
        runs = _runs(index, list(targets))
        groups = balanced_groups(_run_costs(index, runs), threads)
    else:
        index, runs, groups = DecodeIndex((), (), ()), [(None, set(targets))], [range(1)]
    results = thread_map(lambda group: _decode_group(path, index, targets, [runs[k] for k in group], skip_disposable),
                         groups, threads)
    frames: dict[int, np.ndarray] = {}
    for group_frames, group_stats in results:
        frames.update(group_frames)
        stats.add(group_stats)
    return frames
