"""Convert a VideoLLaMA3 safetensors checkpoint (original or transformers-native layout) to our orbax folder.

    python -m convert.hf_to_orbax --model_path VideoLLaMA3-7B --output_dir ckpt/videollama3-7b-orbax [--dtype bfloat16]

Tensors stream one at a time into the model (host memory: the model plus about one tensor), then orbax writes the
parameters; `load_pretrained(output_dir)` restores them directly into any device layout or mesh.
"""
from __future__ import annotations

import argparse
import sys

from cogstream_jax import remote
from cogstream_jax.cli_utils import add_flag, run_cli
from cogstream_jax.errors import ConfigError
from cogstream_jax.io_utils import check_orbax_folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert.hf_to_orbax", description=__doc__.split("\n")[0])
    add_flag(parser, "model_path", required=True,
             help="folder with config.json and model.safetensors or sharded safetensors + index")
    add_flag(parser, "output_dir", required=True, help="folder to write (params/, config.json, cogstream_meta.json)")
    add_flag(parser, "dtype", choices=("bfloat16", "float32"), default="bfloat16",
             help="parameter dtype to store (default bfloat16, the dtype of the released checkpoint)")
    return parser


def convert(model_path: str, output_dir: str, dtype: str = "bfloat16") -> None:
    from cogstream_jax.weights.loader import load_pretrained
    from cogstream_jax.weights.orbax_io import save_orbax

    if remote.absolute(model_path) == remote.absolute(output_dir):
        raise ConfigError(f"--output_dir {output_dir}: must differ from --model_path")
    check_orbax_folder(output_dir)
    model = load_pretrained(model_path, dtype=dtype)
    save_orbax(model, output_dir, source=remote.absolute(model_path), copy_aux_from=model_path)
    print(f"wrote {output_dir} ({dtype}) from {model_path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: convert(args.model_path, args.output_dir, args.dtype))


if __name__ == "__main__":
    sys.exit(main())
