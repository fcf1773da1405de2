"""Export a checkpoint (our orbax folder, or safetensors of either layout) to safetensors in a chosen layout.

    python -m convert.orbax_to_hf --model_path ckpt/videollama3-7b-orbax --output_dir out --layout native

`--layout original` gives the VideoLLaMA3 / CogStream keys, `--layout native` the keys transformers'
`VideoLlama3ForConditionalGeneration.from_pretrained` loads. Tensors are written one at a time.
"""
from __future__ import annotations

import argparse
import re
import sys

from cogstream_jax import remote
from cogstream_jax.cli_utils import add_flag, run_cli
from cogstream_jax.errors import ConfigError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ConfigError(f"--max_shard_size {text!r}: expected e.g. '5GB', '500MB' or a byte count")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert.orbax_to_hf", description=__doc__.split("\n")[0])
    add_flag(parser, "model_path", required=True, help="our orbax folder or a safetensors checkpoint folder")
    add_flag(parser, "output_dir", required=True, help="folder to write config.json + safetensors (+ index)")
    add_flag(parser, "layout", choices=("original", "native"), default="original",
             help="checkpoint key layout to write (default original)")
    add_flag(parser, "dtype", choices=("bfloat16", "float32"), default=None,
             help="dtype to write (default: the stored dtype of an orbax folder, else float32)")
    add_flag(parser, "max_shard_size", default="5GB", help="largest shard file (default 5GB)")
    return parser


def stored_dtype(model_path: str) -> str:
    """The single parameter dtype recorded in an orbax folder, else float32."""
    from cogstream_jax.weights.orbax_io import is_orbax_folder, read_meta

    if remote.isdir(model_path) and is_orbax_folder(model_path):
        dtypes = read_meta(model_path).get("param_dtypes") or []
        if len(dtypes) == 1 and dtypes[0] in ("bfloat16", "float32"):
            return dtypes[0]
    return "float32"


def export(model_path: str, output_dir: str, layout: str, dtype: str | None, max_shard_size: str) -> None:
    from cogstream_jax.weights.export import save_pretrained
    from cogstream_jax.weights.loader import load_pretrained

    if remote.absolute(model_path) == remote.absolute(output_dir):
        raise ConfigError(f"--output_dir {output_dir}: must differ from --model_path")
    max_bytes = parse_size(max_shard_size)
    dtype = dtype or stored_dtype(model_path)
    model = load_pretrained(model_path, dtype=dtype)
    files = save_pretrained(model, output_dir, layout=layout, max_shard_bytes=max_bytes)
    print(f"wrote {output_dir}: {len(files)} safetensors file(s), {layout} layout, {dtype}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(
        lambda: export(args.model_path, args.output_dir, args.layout, args.dtype, args.max_shard_size))


if __name__ == "__main__":
    sys.exit(main())
