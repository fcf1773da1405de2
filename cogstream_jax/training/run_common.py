"""What both stage CLIs share: flags, the resolved run config (printed and saved), model/tokenizer loading,
the optional quantized frozen base, and the final adapter export."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cogstream_jax import persistent_cache
from cogstream_jax.cli_utils import ArgumentParser
from cogstream_jax.config import tiny
from cogstream_jax.errors import ConfigError
from cogstream_jax.io_utils import as_path, atomic_write_text, check_writable
from cogstream_jax.model.qwen2 import REMAT_CHOICES
from cogstream_jax.reference_files import bundled_model_dir
from cogstream_jax.run_settings import as_json
from cogstream_jax.training.distributed import DistributedConfig, is_primary, maybe_initialize
from cogstream_jax.training.step import DEFAULT_REMAT

QUANT_TYPES = {"int8": "int8", "nf4": "nf4"}
TOKENIZER_MARKERS = ("tokenizer_config.json",)
CONFIG_FILE = "train_config.json"
#: the training mesh unless --mesh says otherwise: fsdp over every device (as MaxText), so a 7B base is not copied
#: to each chip; batches still split over data x fsdp
DEFAULT_MESH = "1,-1,1"


def build_common_parser(description: str) -> ArgumentParser:
    p = ArgumentParser(description=description)
    p.add_argument("--model_path", required=True,
                   help="HF VideoLLaMA3 folder (either layout), our orbax folder, or 'tiny' (random tiny model)")
    p.add_argument("--output_dir", required=True, help="checkpoints, metrics.jsonl, train_config.json, adapter/")
    p.add_argument("--mesh", default=DEFAULT_MESH,
                   help="data,fsdp,tensor sizes, e.g. '2,4,1' or 'data=2,fsdp=4' (-1 = the remaining devices; "
                        "default: FSDP over all devices, the frozen base sharded, rows split over data x fsdp)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output_dir")
    p.add_argument("--max_steps", type=int, default=None,
                   help="stop once this many updates are done in total, restored ones included (schedule unchanged)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--learning_rate", type=float, default=None)
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--lora_alpha", type=float, default=16.0)
    p.add_argument("--lora_dropout", type=float, default=0.1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="frozen base dtype")
    p.add_argument("--compute_dtype", default=None, choices=["bfloat16", "float32"])
    p.add_argument("--remat", nargs="?", const="full", default=DEFAULT_REMAT, choices=REMAT_CHOICES,
                   help="rematerialise each decoder layer in the backward pass: full (keep only the layer inputs), "
                        "dots (also keep the projection matmul outputs), offload (as full, the layer inputs kept in "
                        "host memory: for chips that full does not leave room on) or none; '--remat' alone means full "
                        f"(default: {DEFAULT_REMAT})")
    p.add_argument("--no_scan_layers", action="store_true",
                   help="trace every decoder layer separately (default: one jax.lax.scan over the layers, which "
                        "compiles the layer once; same values)")
    p.add_argument("--dropout_rng", default="hash", choices=["hash", "threefry", "rbg"],
                   help="LoRA-dropout masks: hash (counter-based, same masks on any mesh, fast), threefry (same "
                        "masks on any mesh, slow on CPU) or rbg (mesh-dependent)")
    p.add_argument("--base_quant", default="none", choices=["none", *QUANT_TYPES],
                   help="store the frozen base kernels quantized with qwix (QLoRA: int8, or NF4 two codes per byte)")
    p.add_argument("--save_steps", type=int, default=None, help="checkpoint every N updates")
    p.add_argument("--keep_last", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--compiled_dir", default=None,
                   help="gradient executables compiled ahead by compile-check --save_compiled (same flags, mesh, "
                        "JAX and compiler settings): each one whose program is this run's is used instead of "
                        "compiling (stage 2: --token_buckets auto or a list; stage 1: --length_buckets all there)")
    persistent_cache.add_compilation_cache_flag(p)
    p.add_argument("--coordinator_address", default=None, help="multi-host: host:port of process 0")
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None)
    p.add_argument("--no_progress", action="store_true", help="no progress bar (metrics.jsonl is still written)")
    return p


def cli_main(build_parser: Callable[[], argparse.ArgumentParser], run_module: str,
             argv: Sequence[str] | None) -> int:
    """Parse, then run `<run_module>.run(args)` with user errors reported on one line (exit code 2)."""
    import importlib

    from cogstream_jax.cli_utils import forward, run_cli

    args = build_parser().parse_args(forward(argv))
    return run_cli(persistent_cache.wrap(args.compilation_cache_dir,
                                         lambda: importlib.import_module(run_module).run(args)))


def start(args: argparse.Namespace) -> None:
    """Distributed init (guarded), sanity checks of the common flags, and the --resume / earlier-run check
    (before anything is written into --output_dir)."""
    from cogstream_jax.training.checkpoint import check_resume, checkpoint_dir

    maybe_initialize(DistributedConfig.from_env(args.coordinator_address, args.num_processes, args.process_id))
    for flag, minimum in (("max_steps", 1), ("save_steps", 1), ("keep_last", 1), ("lora_r", 1),
                          ("gradient_accumulation_steps", 1)):
        value = getattr(args, flag, None)
        if value is not None and value < minimum:
            raise ConfigError(f"--{flag} must be >= {minimum}, got {value}")
    for flag in ("learning_rate", "lora_alpha"):
        value = getattr(args, flag, None)
        if value is not None and not value > 0:
            raise ConfigError(f"--{flag} must be positive, got {value}")
    if not 0 <= args.lora_dropout < 1:
        raise ConfigError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    check_resume(checkpoint_dir(args.output_dir), args.resume)
    if is_primary():
        check_writable(args.output_dir, orbax=True)


def given(value: Any, default: Any) -> Any:
    """A flag's value, or the stage's default when it was not given (0 is a value, not "not given")."""
    return default if value is None else value


def dtype_of(name: str | None, default: Any = jnp.float32) -> Any:
    return default if name is None else jnp.dtype(name)


def load_model(args: argparse.Namespace, mesh) -> tuple[nnx.Module, pathlib.Path]:
    """(model, folder with the tokenizer/processor files)."""
    param_dtype = dtype_of(args.dtype)
    compute = dtype_of(args.compute_dtype, param_dtype)
    if args.model_path == "tiny":
        from cogstream_jax.model.videollama3 import VideoLlama3

        model = VideoLlama3(tiny(), rngs=nnx.Rngs(args.seed), param_dtype=param_dtype, dtype=compute)
        return model, bundled_model_dir()
    from cogstream_jax.weights.loader import load_pretrained

    model = load_pretrained(args.model_path, dtype=args.dtype, mesh=mesh, compute_dtype=args.compute_dtype)
    folder = as_path(args.model_path)
    if not all((folder / m).is_file() for m in TOKENIZER_MARKERS):
        print(f"note: {folder} has no tokenizer files; using the bundled VideoLLaMA3 tokenizer", file=sys.stderr)
        folder = bundled_model_dir()
    return model, folder


#: what bitsandbytes' QLoRA leaves in full precision: the output embedding (skipped by name) and the patch
#: embedding (a Conv2d there, never replaced; a Linear here)
UNQUANTIZED_MODULES = ("lm_head", "patch_embedding")


def quantize_base(model: nnx.Module, qtype: str) -> int:
    """Store the frozen Linear kernels quantized (`Linear.quantize`: int8, or NF4 packed two codes per byte),
    as the official QLoRA base: its numerics and its memory. Returns the number of kernels quantized."""
    if qtype == "none":
        return 0
    if importlib.util.find_spec("qwix") is None:
        raise ConfigError("--base_quant needs the 'qwix' package (pip install qwix==0.1.8)")
    from cogstream_jax.model.layers import Linear

    count = 0
    for path, module in nnx.iter_modules(model):
        if path and str(path[-1]) in UNQUANTIZED_MODULES:
            continue
        if isinstance(module, Linear) and module.quant is None:
            module.quantize(QUANT_TYPES[qtype])
            count += 1
    return count


def resolved_config(args: argparse.Namespace, **derived: Any) -> dict[str, Any]:
    config = {k: v for k, v in sorted(vars(args).items())}
    config.update(derived)
    config["jax"] = {"devices": jax.device_count(), "processes": jax.process_count(), "backend": jax.default_backend()}
    return config


#: settings a resumed run may change: where and how it runs, not what it computes (mesh and micro-batching change
#: only the summation order; paths may move)
RESUMABLE_CHANGES = frozenset({
    "output_dir", "resume", "max_steps", "save_steps", "keep_last", "no_progress", "mesh", "mesh_shape", "jax",
    "coordinator_address", "num_processes", "process_id", "remat", "no_scan_layers", "decode_threads", "model_path",
    "QA_path", "query_dir", "video_dir", "micro_batch_size", "micro_batch_items", "accumulation_steps",
    "compiled_dir", "compilation_cache_dir"})


def run_fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved settings that define the run (JSON values), checked when a run is resumed."""
    return as_json({k: v for k, v in config.items() if k not in RESUMABLE_CHANGES})


def announce_config(output_dir: str | os.PathLike, config: dict[str, Any]) -> None:
    """Print the resolved config and save it atomically as train_config.json (process 0)."""
    if not is_primary():
        return
    text = json.dumps(config, indent=2, default=str)
    print(text, file=sys.stderr)
    atomic_write_text(as_path(output_dir) / CONFIG_FILE, text + "\n")


def export_adapter(model: nnx.Module, adapter: str, output_dir: str | os.PathLike) -> pathlib.Path | None:
    """The final adapter in the adapter directory format (every process takes part in multi-process runs)."""
    from cogstream_jax.adapter_io import save_adapter

    return save_adapter(model, adapter, as_path(output_dir) / "adapter")


@dataclasses.dataclass(frozen=True)
class LoopResult:
    steps_done: int
    exit_code: int
    last_loss: float | None
