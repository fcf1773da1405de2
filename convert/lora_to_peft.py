"""Convert one of our adapter directories into a PyTorch PEFT LoRA folder.

    python -m convert.lora_to_peft --adapter_dir runs/stage2/adapter --output_dir peft/full_module --layout original

Writes `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight` [r, in], `.lora_B.weight` [out, r])
and `adapter_config.json` whose `target_modules` are the full module paths of the chosen layout: `original` for
the VideoLLaMA3 / CogStream model (`model.layers.{i}.self_attn.q_proj`, `model.mm_projector.readout.0`),
`native` for transformers' `VideoLlama3ForConditionalGeneration` (`model.language_model.layers...`).
Either folder may be an object-store URL (gs://bucket/...).
"""
from __future__ import annotations

import argparse
import sys

from cogstream_jax.cli_utils import add_flag, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert.lora_to_peft", description=__doc__.split("\n")[0])
    add_flag(parser, "adapter_dir", required=True, help="our adapter directory (adapter_meta.json + lora/)")
    add_flag(parser, "output_dir", required=True, help="folder to write the PEFT adapter into")
    add_flag(parser, "layout", choices=("original", "native"), default="original",
             help="module names of the base model PEFT will wrap (default original, as CogStream uses)")
    add_flag(parser, "base_model_name_or_path", default=None,
             help="recorded in adapter_config.json (default: --model_path, else DAMO-NLP-SG/VideoLLaMA3-7B for "
                  "the original layout)")
    add_flag(parser, "model_path", default=None,
             help="optional base checkpoint folder: check that the adapter was made for it")
    return parser


def convert(adapter_dir: str, output_dir: str, layout: str, base_name: str | None, model_path: str | None) -> None:
    from cogstream_jax.config import ModelConfig
    from cogstream_jax.lora_tensors import AdapterTensors, check_against_config, ordered, read_adapter_dir
    from cogstream_jax.peft_io import write_peft_adapter

    from cogstream_jax import remote
    from cogstream_jax.errors import ConfigError

    if remote.absolute(adapter_dir) == remote.absolute(output_dir):  # URLs compare as URLs, not under the cwd
        raise ConfigError(f"--output_dir {output_dir}: must differ from --adapter_dir")
    adapter = read_adapter_dir(adapter_dir)
    config = None
    if model_path is not None:
        config = ModelConfig.from_hf_config(model_path)
        check_against_config(adapter, config, base=f"the base model {model_path}")
    adapter = AdapterTensors(adapter.spec, ordered(config, adapter.tensors), adapter.base_fingerprint, adapter.source)
    write_peft_adapter(adapter, output_dir, layout, base_name if base_name is not None else model_path)
    print(f"wrote {output_dir}: PEFT LoRA adapter, {len(adapter.tensors)} modules, {layout} layout", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: convert(args.adapter_dir, args.output_dir, args.layout,
                                                     args.base_model_name_or_path, args.model_path))


if __name__ == "__main__":
    sys.exit(main())
