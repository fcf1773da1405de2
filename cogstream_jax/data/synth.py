"""Synthetic CogStream dataset generator (protocol section 8): real MP4 segments plus QA/VQA chains.

    python -m cogstream_jax.data.synth --output_dir DIR --videos N --seed S [--long_videos M]

Writes `QA_Dataset/`, `VQA_Dataset/` and `event_segments/` in the official layout. Deterministic for a seed:
video i uses the generator seeded with (seed, i). `--long_videos` adds low-resolution (56x56, 2 fps) streams of
3 x 50 s, i.e. 150 sampled frames at 1 fps, long enough for event compression (> 135 frames) to run.
Outputs are written atomically; an existing complete video is skipped, so an interrupted run can be resumed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from cogstream_jax.io_utils import as_path, atomic_write_json
from cogstream_jax.cli_utils import ArgumentParser, run_cli
from cogstream_jax.data.dataset import QA_DIR, SEGMENTS_DIR, VQA_DIR
from cogstream_jax.data.mp4_writer import write_mp4
from cogstream_jax.data.synth_qa import DraftQA, build_chains
from cogstream_jax.data.synth_scene import Scene, make_scene, render_frame
from cogstream_jax.errors import UserError


@dataclass(frozen=True)
class StreamSpec:
    """How one synthetic video looks: frame size (H, W), source fps, segment length range and count."""

    size: tuple[int, int] = (64, 96)
    fps: float = 8.0
    segments: tuple[int, int] = (2, 3)  # inclusive range of segment counts
    seconds: tuple[float, float] = (5.0, 12.0)  # range of one segment's length (whole or half seconds)


SHORT_STREAM = StreamSpec()
LONG_LOW_RES_STREAM = StreamSpec(size=(56, 56), fps=2.0, segments=(3, 3), seconds=(50.0, 50.0))




def segment_lengths(rng: np.random.Generator, spec: StreamSpec) -> list[float]:
    count = int(rng.integers(spec.segments[0], spec.segments[1] + 1))
    halves = rng.integers(int(spec.seconds[0] * 2), int(spec.seconds[1] * 2) + 1, size=count)
    return [float(h) / 2 for h in halves]


def write_segments(scene: Scene, folder: Path, name: str) -> list[Path]:
    """Render and encode every segment; frame i of segment k shows time start_k + i / fps."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, end in enumerate(scene.segment_ends):
        start = scene.segment_start(k)
        count = int(round((end - start) * scene.fps))
        frames = (render_frame(scene, start + i / scene.fps, k) for i in range(count))
        path = folder / f"{name}_segment_{k + 1}.mp4"
        write_mp4(path, frames, scene.fps, crf=28)
        paths.append(path)
    return paths


def qa_json(chain: list[DraftQA], scene: Scene) -> list[dict]:
    out = []
    for position, qa in enumerate(chain):
        end = scene.segment_ends[qa.segment]
        relevance = [1 if i in qa.coi else 0 for i in range(position)]
        out.append({
            "Q": qa.question,
            "A": qa.answer,
            "T": end,
            "info": {"is_visual": qa.is_visual, "Event_Time": end, "ID": position,
                     "COI": json.dumps(qa.coi), "relevance": json.dumps(relevance)},
        })
    return out


def vqa_json(chains: list[list[DraftQA]], qa_chains: list[list[dict]], scene: Scene, name: str) -> list[dict]:
    out = []
    for c, (chain, records) in enumerate(zip(chains, qa_chains)):
        data = []
        for qa, rec in zip(chain, records):
            k = qa.segment
            info = rec["info"]
            data.append({
                "segment_path": f"{SEGMENTS_DIR}/{name}/{name}_segment_{k + 1}.mp4",
                "segment_timestamp": scene.segment_ends[k],
                "event_timestamp": info["Event_Time"],
                "label": qa.label,
                "is_visual": qa.is_visual,
                "QA_pairs": {f"Q{info['ID'] + 1}": qa.question, f"A{info['ID'] + 1}": qa.answer},
                "ID": info["ID"],
                "COI": info["COI"],
                "relevance": info["relevance"],
            })
        out.append({"video_name": name, "seq_info": f"{c + 1}/{len(chains)}", "Data": data})
    return out


def generate_video(root: Path, name: str, seed: int, index: int, spec: StreamSpec, n_chains: int) -> None:
    """One video: segments first, then VQA, then the QA file last (its presence marks the video complete)."""
    qa_path = root / QA_DIR / f"{name}.json"
    if qa_path.is_file():
        return
    rng = np.random.default_rng([seed, index])
    scene = make_scene(rng, segment_lengths(rng, spec), spec.fps, spec.size)
    write_segments(scene, root / SEGMENTS_DIR / name, name)
    chains = build_chains(scene, rng, n_chains)
    qa_chains = [qa_json(chain, scene) for chain in chains]
    atomic_write_json(root / VQA_DIR / f"{name}.json", vqa_json(chains, qa_chains, scene, name), indent=1)
    atomic_write_json(qa_path, qa_chains, indent=1)


def generate_dataset(
    output_dir: str | os.PathLike, videos: int, seed: int, *, long_videos: int = 0, chains: int = 3
) -> Path:
    """Write `videos` short streams and `long_videos` low-resolution long streams; returns the root."""
    if videos < 0 or long_videos < 0 or videos + long_videos == 0:
        raise UserError("--videos/--long_videos: need at least one video and no negative counts")
    if chains < 1:
        raise UserError("--chains: need at least one chain per video")
    root = as_path(output_dir)
    for sub in (QA_DIR, VQA_DIR, SEGMENTS_DIR):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(videos):
        generate_video(root, f"synth_{seed}_{i:03d}", seed, i, SHORT_STREAM, chains)
    for j in range(long_videos):
        generate_video(root, f"synth_{seed}_long_{j:02d}", seed, videos + j, LONG_LOW_RES_STREAM, chains)
    return root


def sample_dataset_dir() -> Path:
    """The bundled tiny sample (`cogstream_jax/assets/sample`), used by `make demo` and the tests."""
    return Path(str(resources.files("cogstream_jax").joinpath("assets/sample")))


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m cogstream_jax.data.synth", description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", required=True, help="dataset root to write")
    parser.add_argument("--videos", type=int, default=4, help="number of short streams (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--long_videos", type=int, default=0,
                        help="number of 56x56, 2 fps, 150 s streams (event compression runs on them)")
    parser.add_argument("--chains", type=int, default=3, help="dialogue chains per video (default 3)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        root = generate_dataset(args.output_dir, args.videos, args.seed, long_videos=args.long_videos,
                                chains=args.chains)
        print(f"wrote {args.videos + args.long_videos} videos to {root}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
