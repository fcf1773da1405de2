"""One LoRA adapter as plain host tensors, independent of any model instance and of any file format.

Conversions (our adapter directory <-> PEFT folder, merged export) move adapters around without building the
7B model, so they work on `AdapterTensors`: a `LoraSpec`, `{original-layout module name: (A [in, r], B [r, out])}`
and the base fingerprint when one is known. Module names translate between the original (VideoLLaMA3 /
CogStream) and transformers-native layouts with the component prefixes of `cogstream_jax.weights.keys`, and are
checked against a `ModelConfig` with the same module table: no second mapping exists here.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Mapping

import numpy as np

from cogstream_jax.config import ModelConfig
from cogstream_jax.lora import LINEAR_KINDS, AdapterError, LoraSpec
from cogstream_jax.weights.keys import HF_PREFIX, Layout, ModuleEntry, module_entries

Pair = tuple[np.ndarray, np.ndarray]
LAYOUTS: tuple[Layout, ...] = ("original", "native")


@dataclasses.dataclass(frozen=True)
class AdapterTensors:
    """An adapter on the host: spec, tensors keyed by original-layout module names, optional base fingerprint."""

    spec: LoraSpec
    tensors: Mapping[str, Pair]
    base_fingerprint: str | None
    source: str

    @property
    def rank(self) -> int:
        return self.spec.r


# ---------------------------------------------------------------------------------------------- module names
def split_module_name(name: str) -> tuple[Layout | None, str, str]:
    """'model.language_model.layers.0.mlp.up_proj' -> ('native', 'llm', 'layers.0.mlp.up_proj').

    The longest component prefix of either layout wins (the original LLM prefix 'model.' is a prefix of every
    other one); names whose prefix both layouts share (the LM head) have layout None.
    """
    best: tuple[int, Layout | None, str] | None = None
    for layout in LAYOUTS:
        for component, prefix in HF_PREFIX[layout].items():
            if name.startswith(prefix) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), layout, component)
            elif best is not None and name.startswith(prefix) and len(prefix) == best[0] and best[1] != layout:
                best = (len(prefix), None, component)
    assert best is not None  # the head prefix is '' and matches everything
    length, layout, component = best
    return layout, component, name[length:]


def module_in_layout(name: str, layout: Layout) -> str:
    """The same module's name in `layout` (a pure prefix rename, spec section 7.2)."""
    _, component, rel = split_module_name(name)
    return HF_PREFIX[layout][component] + rel


def layout_of(names, source: str) -> Layout:
    """The one layout a set of module names uses ('original' when nothing tells them apart)."""
    found = {split_module_name(n)[0] for n in names} - {None}
    if len(found) > 1:
        raise AdapterError(f"{source}: module names mix the original and the native layout")
    return found.pop() if found else "original"


def modules_by_name(config: ModelConfig, layout: Layout) -> dict[str, ModuleEntry]:
    return {m.hf_module(layout): m for m in module_entries(config)}


# ---------------------------------------------------------------------------------------------- validation
def check_against_config(adapter: AdapterTensors, config: ModelConfig, base: str = "the base model") -> None:
    """Every adapted module must be a Linear of `config` with matching A/B shapes, and the fingerprint must agree."""
    fingerprint = config.fingerprint()
    if adapter.base_fingerprint is not None and adapter.base_fingerprint != fingerprint:
        raise AdapterError(f"{adapter.source}: adapter for a different base (base_fingerprint "
                           f"{adapter.base_fingerprint}, {base} has {fingerprint})")
    modules = modules_by_name(config, "original")
    shapes = linear_shapes(config)
    unknown, not_linear, mismatched = [], [], []
    for name, (a, b) in adapter.tensors.items():
        entry = modules.get(name)
        if entry is None:
            unknown.append(name)
            continue
        if entry.kind not in LINEAR_KINDS:
            not_linear.append(name)
            continue
        in_f, out_f = shapes[entry.our_module]
        want_a, want_b = (in_f, adapter.rank), (adapter.rank, out_f)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            mismatched.append(f"{name}: A {tuple(a.shape)} B {tuple(b.shape)}, {base} needs A {want_a} B {want_b}")
    problems = []
    if unknown:
        problems.append(f"targets module(s) that do not exist in {base}: {_few(unknown)}")
    if not_linear:
        problems.append(f"targets non-Linear module(s) {_few(not_linear)}")
    if mismatched:
        problems.append(f"adapter for a different base: {'; '.join(mismatched[:4])}")
    if problems:
        raise AdapterError(f"{adapter.source}: " + " | ".join(problems))


_ABSTRACT_CACHE: dict[str, Any] = {}


def abstract_for(config: ModelConfig):
    """The fp32 model of `config` with shape-only leaves (allocates nothing, even for 7B); cached per config."""
    key = config.fingerprint()
    if key not in _ABSTRACT_CACHE:
        import jax.numpy as jnp

        from cogstream_jax.weights.loader import abstract_model

        _ABSTRACT_CACHE[key] = abstract_model(config, jnp.float32, jnp.float32)
    return _ABSTRACT_CACHE[key]


def linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """Our module path -> (in_features, out_features) of every Linear, from the abstract model."""
    from flax import nnx

    from cogstream_jax.model.layers import Linear

    return {".".join(str(p) for p in path): tuple(mod.kernel.shape)
            for path, mod in nnx.iter_modules(abstract_for(config)) if isinstance(mod, Linear)}


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def check_rank(adapter_tensors: Mapping[str, Pair], r: int, source: str, field: str) -> None:
    """A [in, r] and B [r, out] of every module must use the declared rank."""
    bad = [f"{name} (A {tuple(a.shape)}, B {tuple(b.shape)})" for name, (a, b) in adapter_tensors.items()
           if a.ndim != 2 or b.ndim != 2 or a.shape[1] != r or b.shape[0] != r]
    if bad:
        raise AdapterError(f"{source}: rank mismatch between tensors and {field}={r}: {_few(bad, 3)}")


def ordered(config: ModelConfig | None, tensors: Mapping[str, Pair]) -> dict[str, Pair]:
    """Tensors in checkpoint order (when a config is known), else in natural name order (layer 2 before 10)."""
    if config is None:
        return dict(sorted(tensors.items(), key=lambda kv: [int(p) if p.isdigit() else p for p in kv[0].split(".")]))
    order = {name: i for i, name in enumerate(modules_by_name(config, "original"))}
    return dict(sorted(tensors.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


# ---------------------------------------------------------------------------------------------- model / our dir
def from_model(model, name: str) -> AdapterTensors:
    """Adapter `name` of a live model, on the host."""
    from cogstream_jax.lora import adapter_spec, adapter_tensors

    return AdapterTensors(adapter_spec(model, name), adapter_tensors(model, name), model.config.fingerprint(),
                          f"adapter {name!r} of the model")


def read_adapter_dir(directory: str | os.PathLike) -> AdapterTensors:
    """Our adapter directory (adapter_meta.json + orbax `lora/`) -> host tensors, without building a model.
    A URL (gs://...) stays a URL: pathlib's absolute() would make it a local `gs:/bucket` folder."""
    from cogstream_jax import adapter_io
    from cogstream_jax.io_utils import as_path

    directory = as_path(directory)
    meta, tensors = adapter_io.read_adapter_tensors(directory)
    check_rank(tensors, meta.spec.r, str(directory / adapter_io.META_FILE), "r")
    return AdapterTensors(meta.spec, tensors, meta.base_fingerprint, str(directory))


def write_adapter_dir(adapter: AdapterTensors, name: str, directory: str | os.PathLike,
                      base_fingerprint: str, created_by: str) -> pathlib.Path:
    """Write our adapter directory format from host tensors, atomically (the format `load_adapter` reads)."""
    from cogstream_jax import adapter_io

    meta = adapter_io.AdapterMeta(name, adapter.spec, base_fingerprint, created_by)
    return adapter_io.write_adapter_dir(directory, meta, adapter.tensors)
