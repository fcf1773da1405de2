"""Merged export: base checkpoint + one LoRA adapter -> a plain checkpoint with W' = W + (alpha/r) B A.

The base safetensors (either layout) stream one tensor at a time into shard files of the chosen layout: each
adapted weight is merged in fp32 (PyTorch orientation: B [out, r] @ A [r, in]) and cast back to the output
dtype, every other tensor is copied. The header of every output shard is planned from the base headers before
any tensor is read, so a 7B export needs about one tensor of host memory. The key tables of
`cogstream_jax.weights.keys` decide every name in both layouts; the result loads in
`transformers.VideoLlama3ForConditionalGeneration.from_pretrained` (native layout) and in `load_pretrained`.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cogstream_jax import remote
from cogstream_jax.io_utils import as_path, atomic_write_bytes, atomic_write_json, read_config_json
from cogstream_jax.config import ModelConfig
from cogstream_jax.errors import ConfigError, WeightError
from cogstream_jax.lora_tensors import AdapterTensors, abstract_for, check_against_config
from cogstream_jax.weights.assign import param_leaves
from cogstream_jax.weights.keys import Layout, TensorEntry, detect_layout, hf_key_table
from cogstream_jax.weights.loader import check_headers
from cogstream_jax.weights.safetensors_io import (INDEX_NAME, Checkpoint, TensorSpec, read_header, read_tensor,
                                                 write_checkpoint)

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
SIGNATURE_METADATA = "cogstream_jax.merged_export"
OUTPUT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16)}
#: base-folder files copied along (tokenizer, processor, generation settings), never weights or config.json
_SIDE_FILE_SUFFIXES = (".json", ".txt", ".py", ".model", ".jinja", ".gz")
_NOT_COPIED = ("config.json", INDEX_NAME, "adapter_config.json")


def merged_weight(weight: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """W [out, in] + scale * (A [in, r] @ B [r, out]).T, in fp32 (the caller casts).

    The delta is formed directly as B.T @ A.T, contiguous in W's [out, in] order (a transposed add is ~7x slower).
    """
    delta = np.asarray(b, np.float32).T @ np.asarray(a, np.float32).T
    delta *= np.float32(scale)
    merged = weight.astype(np.float32)  # always a fresh array: the read buffer is not modified
    merged += delta
    return merged


def export_merged(model_path: str | os.PathLike, adapter: AdapterTensors, output_dir: str | os.PathLike,
                  layout: Layout = "original", dtype: str | None = None,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  on_skip: Callable[[str], None] | None = None) -> list[str]:
    """Write config.json + (sharded) safetensors of base + merged adapter; returns the weight file names.

    `dtype`: "float32" | "bfloat16" output dtype; default keeps each base tensor's dtype. Resumable: shards that
    an interrupted run of the same export already completed are kept (`on_skip(name)` is told about each).
    """
    model_path, output_dir = os.fspath(model_path), os.fspath(output_dir)
    if layout not in ("original", "native"):
        raise ConfigError(f"layout={layout!r}: expected 'original' or 'native'")
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise ConfigError(f"dtype={dtype!r}: expected one of {sorted(OUTPUT_DTYPES)}")
    if remote.absolute(model_path) == remote.absolute(output_dir):
        raise ConfigError(f"--output_dir {output_dir}: must differ from --model_path")
    _refuse_orbax(model_path)
    config = ModelConfig.from_hf_config(model_path)
    check_against_config(adapter, config, base=f"the base model {model_path}")
    checkpoint = Checkpoint(model_path)
    source_table = hf_key_table(config, detect_layout(checkpoint.keys()))
    _, state = nnx.split(abstract_for(config))
    check_headers(checkpoint.path, source_table, param_leaves(state), checkpoint.tensors)
    source_key = {(e.module.our_module, e.our_leaf): key for key, e in source_table.items()}
    target_table = hf_key_table(config, layout)
    out_dtype = OUTPUT_DTYPES.get(dtype) if dtype else None
    specs = []
    for key, entry in target_table.items():
        info = checkpoint.tensors[source_key[(entry.module.our_module, entry.our_leaf)]]
        specs.append(TensorSpec(key, info.shape, out_dtype or info.dtype))

    def produce(spec: TensorSpec) -> np.ndarray:
        entry = target_table[spec.name]
        tensor = read_tensor(checkpoint.tensors[source_key[(entry.module.our_module, entry.our_leaf)]])
        pair = _adapted_pair(adapter, entry)
        if pair is not None:
            tensor = merged_weight(tensor, *pair, adapter.spec.scale)
        return tensor.astype(spec.dtype, copy=False)

    as_path(output_dir).mkdir(parents=True, exist_ok=True)
    signature = _signature(checkpoint, adapter, layout, specs, max_shard_bytes)

    def keep(path: str, shard: list[TensorSpec]) -> bool:
        done = _complete(path, shard, signature)
        if done and on_skip is not None:
            on_skip(os.path.basename(path))
        return done

    files = write_checkpoint(output_dir, specs, produce, max_shard_bytes,
                             {"format": "pt", SIGNATURE_METADATA: signature}, keep)
    hf_config = config.to_hf_config(layout)
    if detect_layout(checkpoint.keys()) == layout:  # keep what we do not model (auto_map for the copied .py files)
        hf_config = {**read_config_json(model_path, "config.json")[0], **hf_config}
    written = {str(s.dtype) for s in specs}
    hf_config["torch_dtype" if layout == "original" else "dtype"] = written.pop() if len(written) == 1 else "float32"
    atomic_write_json(os.path.join(output_dir, "config.json"), hf_config)
    _copy_side_files(model_path, output_dir)
    return files


def _signature(checkpoint: Checkpoint, adapter: AdapterTensors, layout: str, specs: list[TensorSpec],
               max_shard_bytes: int) -> str:
    """What makes two exports identical: base files (name, size, mtime), adapter bytes and scale, output plan."""
    digest = hashlib.sha256(json.dumps([layout, max_shard_bytes, adapter.spec.scale,
                                        [(s.name, s.shape, str(s.dtype)) for s in specs]]).encode())
    for file in checkpoint.files:
        size, mtime = remote.size_and_mtime(file)
        digest.update(f"{os.path.basename(file)}:{size}:{mtime}".encode())
    for name, (a, b) in sorted(adapter.tensors.items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(a).tobytes())
        digest.update(np.ascontiguousarray(b).tobytes())
    return digest.hexdigest()[:32]


def _complete(path: str, shard: list[TensorSpec], signature: str) -> bool:
    from cogstream_jax.peft_io import safetensors_metadata

    if not remote.isfile(path):
        return False
    try:
        header = read_header(path)
        if safetensors_metadata(path).get(SIGNATURE_METADATA) != signature:
            return False
    except (WeightError, OSError, ValueError):
        return False
    return [(i.name, i.shape, i.dtype) for i in sorted(header.values(), key=lambda i: i.start)] == [
        (s.name, tuple(s.shape), np.dtype(s.dtype)) for s in shard]


def _adapted_pair(adapter: AdapterTensors, entry: TensorEntry) -> tuple[np.ndarray, np.ndarray] | None:
    """The adapter's (A, B) for a Linear weight it adapts (never for biases)."""
    if entry.hf_suffix != "weight":
        return None
    return adapter.tensors.get(entry.module.hf_module("original"))


def _refuse_orbax(model_path: str) -> None:
    from cogstream_jax.weights.orbax_io import is_orbax_folder

    if remote.isdir(model_path) and is_orbax_folder(model_path):
        raise WeightError(f"{model_path}: --model_path is an orbax folder; merged export streams safetensors, so "
                          "first run `python -m convert.orbax_to_hf --model_path ... --output_dir BASE`")


def _copy_side_files(model_path: str, output_dir: str) -> None:
    """Tokenizer / processor files of the base, so the merged folder is usable on its own."""
    for name in remote.listdir(model_path):
        src = os.path.join(model_path, name)
        if (name.endswith(_SIDE_FILE_SUFFIXES) and name not in _NOT_COPIED and not name.endswith(".safetensors")
                and remote.isfile(src)):
            atomic_write_bytes(os.path.join(output_dir, name), as_path(src).read_bytes())


def export_merged_from_dir(model_path: str | os.PathLike, adapter_dir: str | os.PathLike,
                           output_dir: str | os.PathLike, adapter_name: str | None = None, **kwargs: Any) -> list[str]:
    """`export_merged` with the adapter read from our adapter directory or a PEFT folder."""
    from cogstream_jax.peft_io import read_any_adapter

    _refuse_orbax(os.fspath(model_path))
    config = ModelConfig.from_hf_config(model_path)
    adapter = read_any_adapter(adapter_dir, adapter_name, config, base=f"the base model {model_path}")
    return export_merged(model_path, adapter, output_dir, **kwargs)
