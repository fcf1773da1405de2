"""Stage 2: video-text interleave reasoning LoRA (`full_module`: LLM targets + projector readout.0/.2).

`python -m train.stage2 --model_path DIR --video_dir DIR --query_dir DIR --num_epochs N --output_dir DIR`
"""
from __future__ import annotations

from typing import Sequence

from cogstream_jax.cli_utils import forward, run_cli
from cogstream_jax.training.run_common import build_common_parser


def build_parser():
    p = build_common_parser(__doc__)
    p.add_argument("--video_dir", required=True, help="the event_segments folder (<vid>/<vid>_segment_<n>.mp4)")
    p.add_argument("--query_dir", required=True, help="the QA_Dataset folder (<vid>.json)")
    p.add_argument("--num_epochs", type=int, required=True)
    p.add_argument("--gradient_accumulation_steps", type=int, default=4, help="QAs per optimiser update")
    p.add_argument("--fps", type=float, default=1.0)
    p.add_argument("--max_frames", type=int, default=180)
    p.add_argument("--event_compression", default=True, action=__import__("argparse").BooleanOptionalAction,
                   help="question-aware event compression on top of DiffFP (when the module is available)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(forward(argv))

    def body() -> int:
        from cogstream_jax.training.stage2_run import run

        return run(args)

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
