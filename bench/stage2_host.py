"""Stage-2 host preparation throughput: QAs per second that `QAStream` prepares (decode at 1 fps, resize, patchify,
chat template and GT rewrite, DiffFP) with one worker, i.e. one QA at a time (the reference, as before
`--prep_workers`), and with several workers, on synthetic full-HD-like streams (default 720p, 30 fps, 3 x 60 s
segments, so later QAs hold up to 180 frames; generated once into `--data`).

Each setting: a fresh processor with the run's frame cache (32 clips) and `--decode_threads`, the stream's QAs in
the run's order (chains share clips, so the cache and its decode-once rule matter), `--qas` QAs taken as fast as
they come; one warm-up pass (page cache), then the median of `--repeats` passes. One JSON line last. Run:
`python bench/stage2_host.py [--workers 1,2,4] [--decode_threads N]`.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import emit, median  # noqa: E402


def make_data(root: pathlib.Path, videos: int, size: tuple[int, int], fps: float, seconds: float) -> pathlib.Path:
    from cogstream_jax.data.dataset import QA_DIR, SEGMENTS_DIR, VQA_DIR
    from cogstream_jax.data.synth import StreamSpec, generate_video

    for sub in (QA_DIR, VQA_DIR, SEGMENTS_DIR):
        (root / sub).mkdir(parents=True, exist_ok=True)
    spec = StreamSpec(size=size, fps=fps, segments=(3, 3), seconds=(seconds, seconds))
    started = time.perf_counter()
    for i in range(videos):  # a complete video is skipped: the data is made once
        generate_video(root, f"host_{i:03d}", 0, i, spec, 2)
    print(f"data in {root} ready after {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return root


def qas_per_second(root: pathlib.Path, workers: int, threads: int | None, qas: int) -> float:
    from cogstream_jax.data.dataset import load_dataset
    from cogstream_jax.data.pipelines import Stage2Config, stage2_dataset
    from cogstream_jax.data.processor import Processor
    from cogstream_jax.reference_files import bundled_model_dir
    from cogstream_jax.training.stage2_run import QAStream

    processor = Processor.from_pretrained(bundled_model_dir(), cache_frames=32, threads=threads)
    dataset = load_dataset(root)
    stream = QAStream(lambda: stage2_dataset(dataset, Stage2Config(seed=0, num_epochs=4)), processor, depth=8,
                      events=True, workers=workers)
    started = time.perf_counter()
    try:
        for _ in range(qas):
            next(stream)
        return qas / (time.perf_counter() - started)
    finally:
        stream.close(wait=True)  # the QAs prepared ahead finish before the next measurement starts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="/tmp/cogstream-bench-host", help="where the synthetic streams are kept")
    p.add_argument("--videos", type=int, default=2)
    p.add_argument("--size", default="720x1280", help="frame height x width")
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--seconds", type=float, default=60.0, help="length of each of a video's 3 segments")
    p.add_argument("--workers", default="1,2", help="worker counts to compare; the first is the reference")
    p.add_argument("--decode_threads", type=int, default=None, help="threads per QA (default: the run's)")
    p.add_argument("--qas", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from cogstream_jax.data.threads import resolve_threads, usable_cores

    height, width = (int(x) for x in args.size.split("x"))
    root = make_data(pathlib.Path(args.data), args.videos, (height, width), args.fps, args.seconds)
    counts = [int(w) for w in args.workers.split(",")]
    rates = {}
    for workers in counts:
        qas_per_second(root, workers, args.decode_threads, args.qas)  # warm-up
        runs = [qas_per_second(root, workers, args.decode_threads, args.qas) for _ in range(args.repeats)]
        rates[workers] = median(runs)
        print(f"{workers} worker(s) x {resolve_threads(args.decode_threads)} decode threads: "
              f"{rates[workers]:.2f} QAs/s (runs {', '.join(f'{r:.2f}' for r in runs)})", file=sys.stderr)
    best = max(rates, key=rates.get)
    emit("stage2_host_prep", rates[best], unit="QAs/s", workers=best, reference_workers=counts[0],
         reference_qas_per_s=round(rates[counts[0]], 3), speedup=round(rates[best] / rates[counts[0]], 3),
         qas_per_s={str(w): round(r, 3) for w, r in rates.items()}, decode_threads=resolve_threads(args.decode_threads),
         cores=usable_cores(), size=args.size, fps=args.fps, qas=args.qas, repeats=args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
