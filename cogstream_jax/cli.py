"""The `cogstream` console script: one entry point, one subcommand per job.

Each subcommand is also reachable as `python -m <module>`; this file only dispatches, so `cogstream X --help`
shows the module's own help with the official underscore flags (hyphenated aliases accepted).
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

#: subcommand -> (module with `main(argv) -> int`, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("cogstream_jax.data.synth", "write a synthetic CogStream dataset (real MP4 segments + QA chains)"),
    "validate-data": ("cogstream_jax.data.validate", "check a CogStream dataset folder and report every problem"),
    "convert": ("convert.hf_to_orbax", "convert VideoLLaMA3 safetensors (either layout) to our orbax checkpoint"),
    "export-hf": ("convert.orbax_to_hf", "export a model back to safetensors (original or native layout)"),
    "train-stage1": ("train.stage1", "stage 1: Historic Dialogue Retrieval LoRA (language_module)"),
    "train-stage2": ("train.stage2", "stage 2: video-text interleave reasoning LoRA (full_module)"),
    "export-peft": ("convert.lora_to_peft", "convert one of our adapter directories to a PyTorch PEFT folder"),
    "import-peft": ("convert.peft_to_lora", "import a PEFT adapter folder into our adapter format"),
    "export-merged": ("convert.export_merged", "write base + adapter merged safetensors"),
    "eval": ("evaluate.answer_generate", "streaming QA evaluation run (official result JSON)"),
    "score": ("evaluate.metrics", "CogStream metrics, retrieval quality and the report"),
    "compile-check": ("cogstream_jax.compilecheck.cli",
                      "compile a job for a TPU slice or GPU host here: per-chip memory, FLOPs, fits or not"),
    "demo": ("cogstream_jax.demo", "the whole life cycle on the bundled sample with a tiny random model"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: cogstream <command> [flags]   (cogstream <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
