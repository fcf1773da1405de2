"""Stage 1: Historic Dialogue Retrieval LoRA (`language_module`), the official first_stage_training recipe.

`python -m train.stage1 --model_path DIR --QA_path DIR --output_dir DIR [--mesh 2,4,1] [--resume]`
"""
from __future__ import annotations

from typing import Sequence

from cogstream_jax.training.run_common import build_common_parser, cli_main


def build_parser():
    p = build_common_parser(__doc__)
    p.add_argument("--QA_path", required=True, help="dataset root (with QA_Dataset/) or its QA_Dataset folder")
    p.add_argument("--num_train_epochs", type=int, default=8)
    p.add_argument("--global_batch_size", type=int, default=32, help="items per update (official 8 x 1 x 4)")
    p.add_argument("--micro_batch_size", type=int, default=None,
                   help="items per accumulation micro-batch (default: one per data-parallel device)")
    p.add_argument("--max_length", type=int, default=2048)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(build_parser, "cogstream_jax.training.stage1_run", argv)


if __name__ == "__main__":
    raise SystemExit(main())
