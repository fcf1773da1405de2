"""Benchmark: our decode + preprocess (1 fps, <= 180 frames, decoding only the kept frames) against decoding
every frame to RGB and subsampling afterwards, on a 3-minute synthetic 30 fps video.

The video (640x360 moving shapes, libx264 crf 23 preset veryfast, GOP 250, yuv420p; x264's default B-frames
unless --no_bframes) is encoded once and cached in the temp dir. Both sides run the same frame selection and
the same resize/normalise/patchify. Also timed: the official pipeline's FFmpeg filter graph
(decode all, fps=1:round=up, rgb24) through PyAV. Prints one JSON line last; `value` = speedup over
"decode every frame".
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time
from fractions import Fraction

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import av  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import emit  # noqa: E402
from cogstream_jax.data.image import compute_resize, frames_to_patches  # noqa: E402
from cogstream_jax.data.video import decode_plan, plan_clip, probe_video  # noqa: E402

SECONDS, FPS, WIDTH, HEIGHT = 180, 30, 640, 360


def synthetic_frames(count: int):
    """Moving coloured shapes on a slowly shifting gradient."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    for index in range(count):
        frame = np.empty((HEIGHT, WIDTH, 3), np.uint8)
        frame[..., 0] = (xx // 3 + index) % 256
        frame[..., 1] = (yy // 2) % 256
        frame[..., 2] = (index // 4) % 256
        for k, color in enumerate(([255, 40, 40], [40, 255, 40], [40, 40, 255])):
            x = int((index * (3 + k) + 150 * k) % (WIDTH - 80))
            y = int((index * (2 + k) + 90 * k) % (HEIGHT - 80))
            frame[y:y + 80, x:x + 80] = color
        yield frame


def ensure_video(bframes: bool) -> pathlib.Path:
    """Encode (once) and cache the benchmark video."""
    folder = pathlib.Path(tempfile.gettempdir()) / "cogstream_bench"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"decode_{WIDTH}x{HEIGHT}_{FPS}fps_{SECONDS}s_gop250_crf23_bf{3 if bframes else 0}.mp4"
    if path.exists():
        return path
    tmp = path.with_suffix(f".tmp{os.getpid()}.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.gop_size = 250
        stream.options = {"crf": "23", "preset": "veryfast", "bf": "3" if bframes else "0"}
        for frame in synthetic_frames(SECONDS * FPS):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return path


def preprocess(frames: np.ndarray) -> np.ndarray:
    size = compute_resize(frames.shape[1], frames.shape[2], len(frames), 2)
    return frames_to_patches(frames, size, 2)[0]


def ours(path: pathlib.Path) -> np.ndarray:
    probe = probe_video(path)
    return preprocess(decode_plan(plan_clip(probe, fps=1, max_frames=180), probe).frames)


def decode_everything(path: pathlib.Path) -> np.ndarray:
    """Baseline: every frame decoded and converted to RGB, then the same frames picked and preprocessed."""
    probe = probe_video(path)
    wanted = plan_clip(probe, fps=1, max_frames=180).frame_indices
    with av.open(str(path)) as container:
        decoded = {}
        for frame in container.decode(container.streams.video[0]):
            decoded[frame.pts] = frame.to_ndarray(format="rgb24")
    ordered = [decoded[p] for p in sorted(decoded)]
    return preprocess(np.stack([ordered[i] for i in wanted]))


def ffmpeg_graph(path: pathlib.Path) -> np.ndarray:
    """The official route: FFmpeg decodes everything and its fps filter picks frames, rgb24 out."""
    outputs = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        graph = av.filter.Graph()
        chain = [graph.add_buffer(template=stream), graph.add("fps", "fps=1:round=up"),
                 graph.add("format", "rgb24"), graph.add("buffersink")]
        for a, b in zip(chain, chain[1:]):
            a.link_to(b)
        graph.configure()

        def drain():
            while True:
                try:
                    outputs.append(graph.pull().to_ndarray(format="rgb24"))
                except (av.BlockingIOError, av.EOFError):
                    return

        for frame in container.decode(stream):
            graph.push(frame)
            drain()
        graph.push(None)
        drain()
    frames = np.stack(outputs)
    if len(frames) > 180:
        frames = frames[np.linspace(0, len(frames) - 1, 180, dtype=int)]
    return preprocess(frames)


def timed_rounds(functions: dict, path, runs: int) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
    """One warm-up round, then `runs` rounds that call every method once each (interleaved, so that changes in
    machine load hit all methods alike)."""
    results = {name: fn(path) for name, fn in functions.items()}
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(runs):
        for name, fn in functions.items():
            start = time.perf_counter()
            results[name] = fn(path)
            times[name].append(time.perf_counter() - start)
    return times, results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--no_bframes", "--no-bframes", action="store_true", help="encode without B-frames")
    args = parser.parse_args(argv)
    path = ensure_video(bframes=not args.no_bframes)
    source_frames = len(probe_video(path).pts)
    times, pixels = timed_rounds({"ours": ours, "all": decode_everything, "graph": ffmpeg_graph}, path, args.runs)
    identical = bool(np.array_equal(pixels["ours"], pixels["all"]) and np.array_equal(pixels["ours"], pixels["graph"]))
    height, width = compute_resize(HEIGHT, WIDTH, 180, 2)
    kept = pixels["ours"].shape[0] // ((height // 14) * (width // 14))
    med = {name: statistics.median(t) for name, t in times.items()}
    labels = {"ours": "ours (decode kept frames)", "all": "decode every frame", "graph": "official ffmpeg graph"}
    for name, label in labels.items():
        print(f"{label:28s} median {med[name]:.3f} s  runs {[round(x, 3) for x in times[name]]}", file=sys.stderr)
    emit("decode", med["all"] / med["ours"],
         unit="speedup (decode every frame / ours), median", video=path.name, source_frames=source_frames,
         kept_frames=kept, runs=args.runs, ours_s=round(med["ours"], 4), decode_all_s=round(med["all"], 4),
         ffmpeg_graph_s=round(med["graph"], 4), ours_source_fps=round(source_frames / med["ours"], 1),
         decode_all_source_fps=round(source_frames / med["all"], 1), ours_kept_fps=round(kept / med["ours"], 1),
         decode_all_kept_fps=round(kept / med["all"], 1),
         speedup_vs_ffmpeg_graph=round(med["graph"] / med["ours"], 3), identical_pixels=identical)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
