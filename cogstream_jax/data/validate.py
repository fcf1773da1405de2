"""Validate a CogStream dataset folder: `python -m cogstream_jax.data.validate --data_dir DIR [--mapping zip]`.

Prints one line per video and every warning (e.g. where the official zip rule maps a QA to a different segment
than its Event_Time); exits 2 with a one-line message naming the file and field on the first hard error.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from cogstream_jax.cli_utils import ArgumentParser, run_cli
from cogstream_jax.data.dataset import MAPPINGS, validate_dataset


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m cogstream_jax.data.validate", description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", required=True, help="folder with QA_Dataset/, VQA_Dataset/, event_segments/")
    parser.add_argument("--mapping", choices=MAPPINGS, default="zip",
                        help="QA-to-segment mapping to report (default: the official zip rule)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        dataset = validate_dataset(args.data_dir, mapping=args.mapping)
        for video in dataset.videos:
            n_qas = sum(len(c.qas) for c in video.chains)
            print(f"{video.name}: {len(video.segments)} segments, {len(video.chains)} chains, {n_qas} QAs")
        for warning in dataset.warnings:
            print(f"warning: {warning}")
        print(f"ok: {len(dataset.videos)} videos, {len(dataset.warnings)} warnings")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
