"""Write real H.264 MP4 files with PyAV (used by the synthetic dataset generator, tests and benchmarks)."""
from __future__ import annotations

import os
from fractions import Fraction
from typing import Iterable

import av
import numpy as np


def write_mp4(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray],
    fps: float,
    *,
    crf: int = 23,
    gop: int = 250,
    preset: str = "veryfast",
) -> str:
    """Encode uint8 RGB frames [H, W, 3] to an H.264 yuv420p MP4 (written atomically).

    Width and height must be even (yuv420p). `fps` may be fractional; the time base is exact. The bytes depend
    only on the frames and settings (single-threaded encoder), so generated datasets are reproducible.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}.mp4"
    rate = Fraction(fps).limit_denominator(1001)
    container = av.open(tmp, mode="w")
    try:
        stream = None
        for frame in frames:
            frame = np.ascontiguousarray(frame, dtype=np.uint8)
            if stream is None:
                height, width = frame.shape[:2]
                if height % 2 or width % 2:
                    raise ValueError(f"{path}: frame size {width}x{height} must be even for yuv420p")
                stream = container.add_stream("libx264", rate=rate)
                stream.width, stream.height = width, height
                stream.pix_fmt = "yuv420p"
                stream.codec_context.gop_size = gop
                # one encoder thread: x264's frame threads made two runs of the same seed differ under load
                stream.options = {"crf": str(crf), "preset": preset, "bf": "0", "threads": "1"}
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        if stream is None:
            raise ValueError(f"{path}: no frames to write")
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
    os.replace(tmp, path)
    return path
