"""Write real H.264 MP4 files with PyAV (used by the synthetic dataset generator, tests and benchmarks)."""
from __future__ import annotations

import os
import pathlib
import tempfile
from fractions import Fraction
from typing import Iterable

import av
import numpy as np

from cogstream_jax.io_utils import atomic_write_bytes, is_url

# libx264 settings that make the output a function of the input frames and the encode arguments alone:
#
# - "threads": "1": x264's frame threads (the default on a multi-core machine) decide with whatever the other
#   threads have finished, so the bytes depended on the core count and the load.
# - "cpu-independent=1": x264's SIMD versions of the macroblock-tree functions (mbtree_propagate_cost/list,
#   which weight each macroblock's quantiser by how much later frames reference it) are not exact. The AVX-512
#   versions process 8 (list) or 16 (cost) macroblocks per step with no tail handling; when the frame is not a
#   multiple of 8 macroblocks wide (128 px; the synthetic 96 px and 56 px streams are not), the last macroblock
#   row reads past the end of x264's cost/motion-vector arrays into allocation padding that x264 never writes,
#   i.e. bytes left in the heap by whatever the process did earlier. Leftover cost words with a list bit set and
#   small motion vectors then propagate into real macroblocks and change the quantisers from some frame on (a
#   full test run after other MP4 work differed from frame 11 of one segment; filling freed heap memory with
#   0xFF bytes changes the old output on every run). All SIMD versions also compute in float with approximate
#   reciprocals (rcpps) and, on newer CPUs, FMA, so their results differ between CPU models anyway. x264's
#   "cpu-independent" option selects its plain C versions of these two functions, which stop at the row end;
#   x264's other SIMD functions are bit-exact with their C versions (here "asm=0", all C, gives the same
#   bytes), so the output is the same on any x86 CPU and in any process state (tests/test_synth.py regenerates
#   the bundled sample after dirtying the heap). It costs nothing measurable at these frame sizes.
X264_OPTIONS = {"threads": "1", "x264-params": "cpu-independent=1"}


def write_mp4(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray],
    fps: float,
    *,
    crf: int = 23,
    gop: int = 250,
    preset: str = "veryfast",
    bframes: int = 0,
) -> str:
    """Encode uint8 RGB frames [H, W, 3] to an H.264 yuv420p MP4 (written atomically).

    Width and height must be even (yuv420p). `fps` may be fractional; the time base is exact. `bframes` is
    libx264's B-frame limit (0: P-frames only). The bytes depend only on the frames and these arguments, not on
    the machine or on what the process did before, so generated datasets are reproducible (see X264_OPTIONS).
    """
    path = os.fspath(path)
    remote = is_url(path)  # an object store: encode into a local temp file, then upload it as one object
    if remote:
        fd, tmp = tempfile.mkstemp(suffix=".mp4")
        os.close(fd)  # PyAV opens the file by name
    else:
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
                stream.options = {"crf": str(crf), "preset": preset, "bf": str(bframes), **X264_OPTIONS}
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        if stream is None:
            raise ValueError(f"{path}: no frames to write")
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
    if remote:
        try:
            atomic_write_bytes(path, pathlib.Path(tmp).read_bytes())
        finally:
            os.unlink(tmp)
    else:
        os.replace(tmp, path)
    return path
