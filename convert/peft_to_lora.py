"""Import a PyTorch PEFT LoRA folder (either layout) into our adapter directory format.

    python -m convert.peft_to_lora --adapter_dir cogstream_lora --adapter_name full_module --output_dir adapters/full

`--adapter_dir` holds `adapter_config.json` + `adapter_model.safetensors`, or is peft's multi-adapter save layout
(one sub-folder per adapter; `--adapter_name` picks it). The adapter is checked against the base model: `--model_path`
(a checkpoint folder), else the folder its `base_model_name_or_path` names when that exists here, else the bundled
VideoLLaMA3-7B config that CogStream's adapters are made for. Folders may be object-store URLs (gs://bucket/...).
"""
from __future__ import annotations

import argparse
import os
import sys

from cogstream_jax import remote
from cogstream_jax.cli_utils import add_flag, run_cli
from cogstream_jax.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert.peft_to_lora", description=__doc__.split("\n")[0])
    add_flag(parser, "adapter_dir", required=True, help="PEFT adapter folder")
    add_flag(parser, "adapter_name", required=True,
             help="name of the adapter in our format: language_module (QA selection) or full_module (answering)")
    add_flag(parser, "output_dir", required=True, help="our adapter directory to write")
    add_flag(parser, "model_path", default=None, help="base checkpoint folder to check the adapter against")
    return parser


def base_config(model_path: str | None, adapter_dir: str, adapter_name: str):
    """The config of the base model the adapter must fit, and a description of where it came from."""
    import json

    from cogstream_jax.config import ModelConfig, videollama3_7b
    from cogstream_jax.peft_io import CONFIG_FILE, adapter_folder

    if model_path is not None:
        return ModelConfig.from_hf_config(model_path), model_path
    folder = adapter_folder(adapter_dir, adapter_name)
    try:
        named = json.loads((folder / CONFIG_FILE).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        named = None
    if isinstance(named, str) and _has_config(named):
        return ModelConfig.from_hf_config(named), named
    return videollama3_7b(), "VideoLLaMA3-7B by default; pass --model_path for another base"


def _has_config(folder: str) -> bool:
    """Whether `folder` (a local path or a gs:// URL) holds config.json; a hub id or an unsupported URL scheme
    is simply not a folder here."""
    try:
        return remote.isfile(os.path.join(folder, "config.json"))
    except ConfigError:
        return False


def convert(adapter_dir: str, adapter_name: str, output_dir: str, model_path: str | None) -> None:
    from cogstream_jax import __version__
    from cogstream_jax.lora_tensors import write_adapter_dir
    from cogstream_jax.peft_io import read_peft_adapter

    if not adapter_name or "/" in adapter_name:
        from cogstream_jax.lora import AdapterError
        raise AdapterError(f"--adapter_name {adapter_name!r}: expected a plain name such as full_module")
    config, base = base_config(model_path, adapter_dir, adapter_name)
    adapter = read_peft_adapter(adapter_dir, adapter_name, config, base=f"the base model ({base})")
    write_adapter_dir(adapter, adapter_name, output_dir, config.fingerprint(),
                      f"cogstream_jax {__version__} (convert.peft_to_lora from {remote.absolute(adapter_dir)})")
    print(f"wrote {output_dir}: adapter {adapter_name!r}, {len(adapter.tensors)} modules", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(
        lambda: convert(args.adapter_dir, args.adapter_name, args.output_dir, args.model_path))


if __name__ == "__main__":
    sys.exit(main())
