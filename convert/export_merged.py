"""Export a base checkpoint with one LoRA adapter merged in: W + (alpha/r) B A computed in fp32.

    python -m convert.export_merged --model_path ckpt/VideoLLaMA3-7B --adapter_dir adapters/full_module \
        --output_dir merged/full --layout native

`--model_path`: safetensors checkpoint folder of either layout. `--adapter_dir`: our adapter directory or a PEFT
folder. The output (config.json + shards + index, tokenizer files copied) loads in transformers (`--layout
native`) and in `cogstream_jax.weights.loader.load_pretrained` (both layouts). Tensors stream one at a time;
re-running an interrupted export keeps the shards it had completed.
"""
from __future__ import annotations

import argparse
import sys

from cogstream_jax.cli_utils import add_flag, run_cli
from convert.orbax_to_hf import parse_size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert.export_merged", description=__doc__.split("\n")[0])
    add_flag(parser, "model_path", required=True, help="base safetensors checkpoint folder (either layout)")
    add_flag(parser, "adapter_dir", required=True, help="our adapter directory or a PEFT adapter folder")
    add_flag(parser, "output_dir", required=True, help="folder to write the merged checkpoint into")
    add_flag(parser, "layout", choices=("original", "native"), default="original",
             help="checkpoint key layout to write (default original)")
    add_flag(parser, "adapter_name", default=None, help="sub-folder of a multi-adapter PEFT save to merge")
    add_flag(parser, "dtype", choices=("bfloat16", "float32"), default=None,
             help="dtype to write (default: each base tensor's dtype)")
    add_flag(parser, "max_shard_size", default="5GB", help="largest shard file (default 5GB)")
    return parser


def export(args: argparse.Namespace) -> None:
    from cogstream_jax.merged_export import export_merged_from_dir

    kept: list[str] = []
    files = export_merged_from_dir(args.model_path, args.adapter_dir, args.output_dir, args.adapter_name,
                                   layout=args.layout, dtype=args.dtype,
                                   max_shard_bytes=parse_size(args.max_shard_size), on_skip=kept.append)
    if kept:
        print(f"resumed: kept {len(kept)} shard(s) an earlier run of this export completed", file=sys.stderr)
    print(f"wrote {args.output_dir}: {len(files)} safetensors file(s), {args.layout} layout, adapter merged",
          file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: export(args))


if __name__ == "__main__":
    sys.exit(main())
