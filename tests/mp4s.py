"""Test helper: write small real H.264 MP4 files whose frames are all distinct (moving square, per-frame colour).

Distinct frames let the tests identify which source frame a decoder or an FFmpeg filter graph returned.
"""
from __future__ import annotations

import pathlib
from typing import Iterator

import numpy as np

from cogstream_jax.data.mp4_writer import write_mp4


def moving_frames(count: int, height: int, width: int, *, seed: int = 0, static_every: int = 0) -> Iterator[np.ndarray]:
    """Gradient background, a moving square and a per-frame blue level; `static_every=k` repeats every k-th
    frame unchanged (identical consecutive frames, for DiffFP)."""
    yy, xx = np.mgrid[0:height, 0:width]
    side = max(2, min(height, width) // 4)
    background = np.zeros((height, width, 3), np.uint8)
    background[..., 0] = (xx * 255 // max(1, width - 1) + seed * 31) % 256
    background[..., 1] = (yy * 255 // max(1, height - 1)) % 256
    previous = None
    for index in range(count):
        if static_every and previous is not None and index % static_every == 0:
            yield previous
            continue
        frame = background.copy()
        frame[..., 2] = (index * 7 + seed * 13) % 256
        cx = (index * 3) % max(1, width - side)
        cy = (index * 2) % max(1, height - side)
        frame[cy:cy + side, cx:cx + side] = [255, (255 - index) % 256, (index * 11) % 256]
        previous = frame
        yield frame


def write_test_video(directory: pathlib.Path, name: str, *, fps: float, count: int, height: int, width: int,
                     seed: int = 0, crf: int = 18, static_every: int = 0, gop: int = 250) -> pathlib.Path:
    """Encode `count` distinct frames at `fps` into directory/name (H.264, yuv420p, no B-frames)."""
    path = pathlib.Path(directory) / name
    write_mp4(path, moving_frames(count, height, width, seed=seed, static_every=static_every), fps, crf=crf, gop=gop)
    return path


def write_bframe_video(directory: pathlib.Path, name: str, *, fps: float, count: int, height: int, width: int,
                       seed: int = 0, gop: int = 250) -> pathlib.Path:
    """Like `write_test_video` but with libx264's default B-frames (non-reference pictures occur)."""
    path = pathlib.Path(directory) / name
    write_mp4(path, moving_frames(count, height, width, seed=seed), fps, crf=18, gop=gop, bframes=3)
    return path


def ffmpeg_graph_frames(path: pathlib.Path, *, fps: float = 1, trim: tuple[str, str] | None = None
                        ) -> tuple[list[int], np.ndarray]:
    """Test oracle: run the official FFmpeg graph ([trim, setpts=PTS-STARTPTS,] fps=<fps>:round=up,
    format=rgb24) with PyAV's filter graph on `path`.

    Returns the source frame indices (presentation order) of the output frames, found by matching each output
    against a plain decode of every frame, and the rgb24 output frames themselves.
    """
    import av

    with av.open(str(path)) as container:
        decoded = [(f.pts, f.to_ndarray(format="rgb24")) for f in container.decode(container.streams.video[0])]
    decoded.sort(key=lambda item: item[0])
    lookup: dict[bytes, int] = {}
    for rank, (_, rgb) in enumerate(decoded):
        assert rgb.tobytes() not in lookup, f"{path}: frames {lookup.get(rgb.tobytes())} and {rank} are identical"
        lookup[rgb.tobytes()] = rank
    outputs: list[np.ndarray] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        graph = av.filter.Graph()
        node = graph.add_buffer(template=stream)
        chain = []
        if trim is not None:
            chain += [graph.add("trim", f"start={trim[0]}:end={trim[1]}"), graph.add("setpts", "PTS-STARTPTS")]
        chain += [graph.add("fps", f"fps={fps}:round=up"), graph.add("format", "rgb24"), graph.add("buffersink")]
        for nxt in chain:
            node.link_to(nxt)
            node = nxt
        graph.configure()

        def drain() -> None:
            while True:
                try:
                    outputs.append(graph.pull().to_ndarray(format="rgb24"))
                except (av.BlockingIOError, av.EOFError):
                    return

        ended = False
        for frame in container.decode(stream):
            try:
                graph.push(frame)
            except av.EOFError:  # trim reached its end
                ended = True
                break
            drain()
        if not ended:
            try:
                graph.push(None)
            except av.EOFError:
                pass
        drain()
    indices = [lookup[out.tobytes()] for out in outputs]
    frames = np.stack(outputs) if outputs else np.zeros((0, 1, 1, 3), np.uint8)
    return indices, frames
