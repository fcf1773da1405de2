"""Benchmark: our decode + preprocess (1 fps, <= 180 frames, decoding only the kept frames) against decoding
every frame to RGB and subsampling afterwards, on a 3-minute synthetic 30 fps video.

The video (640x360 moving shapes, libx264 crf 23 preset veryfast, GOP 250, yuv420p; x264's default B-frames
unless --no_bframes) is encoded once and cached in the temp dir. Both sides run the same frame selection and
the same resize/normalise/patchify. Also timed: the official pipeline's FFmpeg filter graph
(decode all, fps=1:round=up, rgb24) through PyAV.

Each side runs single-threaded and with `--threads` (default: the usable cores, at most 8): ours splits the
work at IDR pictures across decoders and resizes frames in parallel; "decode every frame" gets FFmpeg's frame
threading and the same parallel resize. Prints one JSON line last; `value` = speedup over "decode every frame"
at the same thread count (like for like); the single-threaded ratio is reported beside it.
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
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import av  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import emit  # noqa: E402
from cogstream_jax.data.threads import default_threads  # noqa: E402
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


def preprocess(frames: np.ndarray, threads: int = 1) -> np.ndarray:
    size = compute_resize(frames.shape[1], frames.shape[2], len(frames), 2)
    return frames_to_patches(frames, size, 2, threads=threads)[0]


def ours(path: pathlib.Path, threads: int = 1) -> np.ndarray:
    probe = probe_video(path)
    clip = decode_plan(plan_clip(probe, fps=1, max_frames=180), probe, threads=threads)
    return preprocess(clip.frames, threads)


def decode_everything(path: pathlib.Path, threads: int = 1) -> np.ndarray:
    """Baseline: every frame decoded (FFmpeg frame threading when threads > 1) and converted to RGB, then the
    same frames picked and preprocessed."""
    probe = probe_video(path)
    wanted = plan_clip(probe, fps=1, max_frames=180).frame_indices
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if threads > 1:
            stream.codec_context.thread_type, stream.codec_context.thread_count = "FRAME", threads
        decoded = {}
        for frame in container.decode(stream):
            decoded[frame.pts] = frame.to_ndarray(format="rgb24")
    ordered = [decoded[p] for p in sorted(decoded)]
    return preprocess(np.stack([ordered[i] for i in wanted]), threads)


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
    parser.add_argument("--threads", type=int, default=default_threads(), help="threads of the parallel runs")
    parser.add_argument("--no_bframes", "--no-bframes", action="store_true", help="encode without B-frames")
    args = parser.parse_args(argv)
    path = ensure_video(bframes=not args.no_bframes)
    source_frames = len(probe_video(path).pts)
    n = args.threads
    methods = {"ours_1": partial(ours, threads=1), "all_1": partial(decode_everything, threads=1),
               "graph": ffmpeg_graph}
    if n > 1:
        methods.update({f"ours_{n}": partial(ours, threads=n), f"all_{n}": partial(decode_everything, threads=n)})
    times, pixels = timed_rounds(methods, path, args.runs)
    identical = all(np.array_equal(pixels["ours_1"], other) for other in pixels.values())
    height, width = compute_resize(HEIGHT, WIDTH, 180, 2)
    kept = pixels["ours_1"].shape[0] // ((height // 14) * (width // 14))
    med = {name: statistics.median(t) for name, t in times.items()}
    labels = {"ours": "ours (decode kept frames)", "all": "decode every frame", "graph": "official ffmpeg graph"}
    for name in methods:
        kind, _, threads = name.partition("_")
        label = labels[kind] + (f", {threads} thread{'s' * (threads != '1')}" if threads else "")
        print(f"{label:40s} median {med[name]:.3f} s  runs {[round(x, 3) for x in times[name]]}", file=sys.stderr)
    ours_n, all_n = med[f"ours_{n}"], med[f"all_{n}"]
    emit("decode", all_n / ours_n,
         unit=f"speedup (decode every frame / ours, both with {n} threads), median", video=path.name,
         source_frames=source_frames, kept_frames=kept, runs=args.runs, threads=n,
         ours_s=round(ours_n, 4), decode_all_s=round(all_n, 4),
         ours_1thread_s=round(med["ours_1"], 4), decode_all_1thread_s=round(med["all_1"], 4),
         speedup_1thread=round(med["all_1"] / med["ours_1"], 3),
         speedup_vs_1thread_decode_all=round(med["all_1"] / ours_n, 3),
         ffmpeg_graph_s=round(med["graph"], 4), speedup_vs_ffmpeg_graph=round(med["graph"] / ours_n, 3),
         ours_source_fps=round(source_frames / ours_n, 1), ours_kept_fps=round(kept / ours_n, 1),
         identical_pixels=identical)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
