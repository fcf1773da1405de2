"""PyTorch PEFT adapter folders <-> our LoRA adapters (issue 6).

A PEFT LoRA folder is `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], where `<module>` is the full
module path in the base model the adapter was made for: the original VideoLLaMA3 layout
(`model.layers.3.self_attn.q_proj`, `model.mm_projector.readout.0`: what CogStream's training scripts write) or
the transformers-native one (`model.language_model.layers.3...`, `model.projector.readout.0`). Our tensors are
A = lora_A.weight.T [in, r] and B = lora_B.weight.T [r, out] with the same scale alpha / r.

PEFT loads an adapter whose keys lack the right prefix "successfully" with B left at zero, and silently skips
weights for modules its `target_modules` do not match, so reading checks both: every tensor must belong to a module
the config targets, every target must exist, and the rank must agree with the config. We write
`target_modules` as the full module paths (never leaf names such as `q_proj`, which would also wrap the vision
tower's projections). The base fingerprint travels in the safetensors metadata, so an adapter written here refuses
a different base when it comes back. Folders may be object-store URLs (gs://bucket/...), read and written there
(each file one upload).
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import re
from typing import Any

import numpy as np

from cogstream_jax import remote
from cogstream_jax.io_utils import as_given, atomic_write_json
from cogstream_jax.adapter_io import read_json_object
from cogstream_jax.config import ModelConfig
from cogstream_jax.lora import AdapterError, LoraSpec, add_adapter, adapter_names, delete_adapter, set_adapter_tensors
from cogstream_jax.lora_tensors import (AdapterTensors, check_against_config, check_rank, from_model, layout_of,
                                        module_in_layout, modules_by_name, ordered)
from cogstream_jax.weights.keys import Layout
from cogstream_jax.weights.safetensors_io import Checkpoint, TensorSpec, write_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
FINGERPRINT_METADATA = "cogstream_jax.base_fingerprint"
#: what `base_model_name_or_path` says when the caller names nothing (the original layout's released base)
DEFAULT_BASE_NAME = {"original": "DAMO-NLP-SG/VideoLLaMA3-7B", "native": None}
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
#: PEFT features our LoRA cannot represent (each is off when its value is falsy)
_UNSUPPORTED = ("use_dora", "lora_bias", "modules_to_save", "layer_replication", "trainable_token_indices",
                "target_parameters", "fan_in_fan_out", "rank_pattern", "alpha_pattern")


# ---------------------------------------------------------------------------------------------- folder lookup
def adapter_folder(directory: str | os.PathLike, adapter_name: str | None = None) -> pathlib.Path:
    """The folder holding one adapter: `<dir>/<adapter_name>/` in peft's multi-adapter save layout, else `<dir>`."""
    directory = as_given(directory)
    if not directory.is_dir():
        raise AdapterError(f"{directory}: PEFT adapter folder does not exist")
    if adapter_name and (directory / adapter_name / CONFIG_FILE).is_file():
        return directory / adapter_name
    if (directory / CONFIG_FILE).is_file():
        return directory
    subfolders = sorted(p.name for p in directory.iterdir() if (p / CONFIG_FILE).is_file())
    hint = f"; it holds adapters {subfolders} (pick one with its name)" if subfolders else ""
    raise AdapterError(f"{directory / CONFIG_FILE}: missing adapter_config.json{hint}")


# ---------------------------------------------------------------------------------------------- reading
def read_peft_config(folder: pathlib.Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    raw = read_json_object(path)
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: field 'peft_type' is {raw.get('peft_type')!r}; only LORA adapters convert")
    for field in ("r", "lora_alpha", "target_modules"):
        if raw.get(field) in (None, "", []):
            raise AdapterError(f"{path}: missing field {field!r}")
    if raw.get("bias", "none") != "none":
        raise AdapterError(f"{path}: field 'bias' is {raw['bias']!r}; only bias 'none' is supported")
    for field in _UNSUPPORTED:
        if raw.get(field):
            raise AdapterError(f"{path}: field {field!r}={raw[field]!r} is not supported (plain LoRA with one rank "
                               "and alpha for all modules only)")
    if not isinstance(raw["r"], int) or raw["r"] <= 0:
        raise AdapterError(f"{path}: field 'r' must be a positive integer, got {raw['r']!r}")
    return raw


def read_peft_adapter(directory: str | os.PathLike, adapter_name: str | None = None,
                      config: ModelConfig | None = None, base: str = "the base model") -> AdapterTensors:
    """A PEFT LoRA folder (either layout; single adapter or peft's multi-adapter layout) -> host tensors.

    Module names come back in the original layout; the spec's targets are the explicit adapted modules. With a
    `config`, every `target_modules` entry and every adapted module must exist in that base, with its shapes.
    """
    folder = adapter_folder(directory, adapter_name)
    raw = read_peft_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        other = " (adapter_model.bin is not read: re-save it with safe_serialization=True)" \
            if (folder / "adapter_model.bin").is_file() else ""
        raise AdapterError(f"{weights}: missing adapter weights{other}")
    tensors = _collect_pairs(Checkpoint(os.fspath(weights)), str(weights))
    layout = layout_of(tensors, str(weights))  # also rejects a file mixing both layouts
    _check_targets_cover(raw["target_modules"], list(tensors), str(folder / CONFIG_FILE))
    if config is not None:
        _check_targets_exist(raw["target_modules"], list(modules_by_name(config, layout)),
                             f"{folder / CONFIG_FILE}", f"{base} ({layout} layout)")
    check_rank(tensors, raw["r"], str(weights), f"{CONFIG_FILE} field 'r'")
    r = raw["r"]
    tensors = ordered(config, {module_in_layout(m, "original"): pair for m, pair in tensors.items()})
    try:
        alpha = float(raw["lora_alpha"]) * (math.sqrt(r) if raw.get("use_rslora") else 1.0)  # rsLoRA: alpha/sqrt(r)
        spec = LoraSpec(r=r, alpha=alpha, dropout=float(raw.get("lora_dropout", 0.0)), target_modules=tuple(tensors))
    except (AdapterError, TypeError, ValueError) as e:
        raise AdapterError(f"{folder / CONFIG_FILE}: invalid 'lora_alpha' / 'lora_dropout': {e}") from None
    fingerprint = safetensors_metadata(weights).get(FINGERPRINT_METADATA)
    adapter = AdapterTensors(spec, tensors, fingerprint, str(folder))
    if config is not None:
        check_against_config(adapter, config, base)
    return adapter


def _collect_pairs(checkpoint: Checkpoint, source: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{module in the file's layout: (A [in, r], B [r, out])} from PEFT keys, strictly. The names are checked
    before any tensor is read, and the tensors come through one open file (one stream from an object store)."""
    found: dict[str, dict[str, np.ndarray]] = {}
    bad = [key for key in checkpoint.tensors if _KEY_RE.match(key) is None]
    if bad:
        hint = f" (PEFT keys start with '{KEY_PREFIX}' and end in '.lora_A.weight' / '.lora_B.weight')"
        raise AdapterError(f"{source}: {len(bad)} key(s) are not LoRA A/B weights: {', '.join(bad[:4])}{hint}")
    arrays = dict(checkpoint.iter_tensors())
    for key in checkpoint.tensors:  # header order, as before
        match = _KEY_RE.match(key)
        found.setdefault(match["module"], {})[match["ab"]] = arrays.pop(key).T  # PEFT [r, in] / [out, r]
    if not found:
        raise AdapterError(f"{source}: no LoRA tensors")
    half = [m for m, pair in found.items() if set(pair) != {"A", "B"}]
    if half:
        raise AdapterError(f"{source}: module(s) with only one of lora_A / lora_B: {', '.join(half[:4])}")
    return {m: (pair["A"], pair["B"]) for m, pair in found.items()}


def _peft_matches(target: str | list[str], module: str) -> bool:
    """PEFT's rule: a string is a regex full-matched; a list entry matches the name or a dotted suffix of it."""
    if isinstance(target, str):
        return re.fullmatch(target, module) is not None
    return any(module == t or module.endswith("." + t) for t in target)


def _check_targets_cover(targets: str | list[str], modules: list[str], source: str) -> None:
    """Each weight must belong to a targeted module, or PEFT would silently drop it."""
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise AdapterError(f"{source}: field 'target_modules' is an invalid regex: {e}") from None
    elif not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"{source}: field 'target_modules' must be a list of module names or a regex string")
    untargeted = [m for m in modules if not _peft_matches(targets, m)]
    if untargeted:
        raise AdapterError(f"{source}: field 'target_modules' does not cover module(s) that have weights "
                           f"(PEFT would ignore them): {', '.join(untargeted[:4])}")


def _check_targets_exist(targets: str | list[str], names: list[str], source: str, base: str) -> None:
    """Every entry of `target_modules` must name a module of the base model."""
    entries = [targets] if isinstance(targets, str) else targets
    missing = [t for t in entries
               if not any(_peft_matches(t if isinstance(targets, str) else [t], n) for n in names)]
    if missing:
        raise AdapterError(f"{source}: field 'target_modules' names module(s) that do not exist in {base}: "
                           f"{', '.join(missing[:4])}")


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors header (read_header validates the rest)."""
    import struct

    with remote.open_file(os.fspath(path), "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


# ---------------------------------------------------------------------------------------------- writing
def peft_config_json(spec: LoraSpec, modules: list[str], base_model_name_or_path: str | None) -> dict[str, Any]:
    """adapter_config.json for one adapter, with `target_modules` as full module paths."""
    alpha: float | int = int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": spec.r, "lora_alpha": alpha, "lora_dropout": spec.dropout,
        "target_modules": modules, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }


def write_peft_adapter(adapter: AdapterTensors, output_dir: str | os.PathLike, layout: Layout = "original",
                       base_model_name_or_path: str | None = None) -> pathlib.Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` (each file atomically) for `layout`. An earlier
    config goes first and the new one comes last, so an interrupted overwrite leaves a folder PEFT refuses
    rather than new weights read with an old scale. A URL `output_dir` gets each file as one upload."""
    if layout not in ("original", "native"):
        raise AdapterError(f"layout={layout!r}: expected 'original' or 'native'")
    output_dir = as_given(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    modules = {module_in_layout(name, layout): pair for name, pair in adapter.tensors.items()}
    arrays: dict[str, np.ndarray] = {}
    for module, (a, b) in modules.items():
        arrays[f"{KEY_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(np.asarray(a).T)
        arrays[f"{KEY_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(np.asarray(b).T)
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in arrays.items()]
    metadata = {"format": "pt"}
    if adapter.base_fingerprint:
        metadata[FINGERPRINT_METADATA] = adapter.base_fingerprint
    (output_dir / CONFIG_FILE).unlink(missing_ok=True)
    write_file(os.fspath(output_dir / WEIGHTS_FILE), specs, lambda spec: arrays[spec.name], metadata)
    base = base_model_name_or_path if base_model_name_or_path is not None else DEFAULT_BASE_NAME[layout]
    atomic_write_json(os.fspath(output_dir / CONFIG_FILE), peft_config_json(adapter.spec, list(modules), base))
    return output_dir


# ---------------------------------------------------------------------------------------------- model level
def save_peft_adapter(model, name: str, output_dir: str | os.PathLike, layout: Layout = "original",
                      base_model_name_or_path: str | None = None) -> pathlib.Path:
    """Adapter `name` of a live model -> a PEFT folder."""
    adapter = from_model(model, name)
    adapter = AdapterTensors(adapter.spec, ordered(model.config, adapter.tensors), adapter.base_fingerprint,
                             adapter.source)
    return write_peft_adapter(adapter, output_dir, layout, base_model_name_or_path)


def load_peft_adapter(model, directory: str | os.PathLike, name: str, adapter_name: str | None = None) -> str:
    """Add the PEFT adapter in `directory` to `model` under `name` (not activated); returns `name`.

    `adapter_name` picks a sub-folder of peft's multi-adapter save layout (defaults to `name`).
    """
    adapter = read_peft_adapter(directory, adapter_name or name, model.config)
    if name in adapter_names(model):
        raise AdapterError(f"{directory}: the model already holds an adapter named {name!r}")
    add_adapter(model, name, adapter.spec)
    try:
        set_adapter_tensors(model, name, adapter.tensors, source=adapter.source)
    except BaseException:
        delete_adapter(model, name)
        raise
    return name


def read_any_adapter(directory: str | os.PathLike, adapter_name: str | None = None,
                     config: ModelConfig | None = None, base: str = "the base model") -> AdapterTensors:
    """Our adapter directory (adapter_meta.json) or a PEFT folder (adapter_config.json), whichever it is, checked
    against `config` when one is given."""
    from cogstream_jax.adapter_io import META_FILE
    from cogstream_jax.lora_tensors import read_adapter_dir

    if not (as_given(directory) / META_FILE).is_file():
        return read_peft_adapter(directory, adapter_name, config, base)
    adapter = read_adapter_dir(directory)
    if config is not None:
        check_against_config(adapter, config, base)
    return adapter
