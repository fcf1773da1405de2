"""Stage 2: video-text interleave reasoning LoRA (`full_module`: LLM targets + projector readout.0/.2).

`python -m train.stage2 --model_path DIR --video_dir DIR --query_dir DIR --num_epochs N --output_dir DIR`
"""
from __future__ import annotations

import argparse
from typing import Sequence

from cogstream_jax.training.run_common import build_common_parser, cli_main


def build_parser():
    p = build_common_parser(__doc__)
    p.add_argument("--video_dir", required=True, help="the event_segments folder (<vid>/<vid>_segment_<n>.mp4)")
    p.add_argument("--query_dir", required=True, help="the QA_Dataset folder (<vid>.json)")
    p.add_argument("--num_epochs", type=int, required=True)
    p.add_argument("--global_batch_qas", type=int, default=32,
                   help="QAs per optimiser update (default 32: the official 8 processes x 4 accumulated QAs); a "
                        "multiple of data x fsdp x --qas_per_device, the rest is accumulation")
    p.add_argument("--qas_per_device", type=int, default=1, help="QAs per device in one call (rows per device)")
    p.add_argument("--prefetch_qas", type=int, default=8,
                   help="QAs prepared ahead by background threads (0: prepare each QA when it is needed, on the "
                        "training thread, whatever --prep_workers)")
    p.add_argument("--prep_workers", type=int, default=None,
                   help="QAs prepared at once by background threads, each decoding with --decode_threads (default: "
                        "a quarter of the usable cores, 1 to 4)")
    p.add_argument("--logging_steps", type=int, default=10,
                   help="fetch loss/grad_norm from the device and write them every N updates (and at the end)")
    p.add_argument("--frame_cache_clips", type=int, default=32, help="decoded clips kept in host memory (LRU)")
    p.add_argument("--fps", type=float, default=1.0)
    p.add_argument("--max_frames", type=int, default=180)
    p.add_argument("--decode_threads", type=int, default=None,
                   help="host threads decoding and resizing video (default: usable cores, at most 8)")
    p.add_argument("--token_buckets", "--token-buckets", default="auto",
                   help="gradient programs by QA length: auto (the --token_bucket_count sizes with the least padding "
                        "for the first --bucket_scan_qas QAs, then the fixed ladder), ladder (256, 512, 768, 1024, "
                        "1536, 2048, 3072, ...) or token counts like 256,640,1920 (multiples of 128)")
    p.add_argument("--token_bucket_count", "--token-bucket-count", type=int, default=5,
                   help="auto: how many sizes to choose (each one gradient program)")
    p.add_argument("--bucket_scan_qas", "--bucket-scan-qas", type=int, default=512,
                   help="auto: distinct QAs from the start of the stream prepared once to choose the sizes")
    p.add_argument("--event_compression", default=True, action=argparse.BooleanOptionalAction,
                   help="question-aware event compression on top of DiffFP (when the module is available)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(build_parser, "cogstream_jax.training.stage2_run", argv)


if __name__ == "__main__":
    raise SystemExit(main())
