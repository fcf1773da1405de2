"""Named LoRA adapters on a VideoLlama3 with PEFT semantics.

An adapter is a set of `LoraWeights` (A [in, r], B [r, out], scale alpha/r, dropout on A's input) held by the
targeted `Linear` modules under one name. Several adapters live side by side (CogReasoner uses
`language_module` for QA selection and `full_module` for answering); `set_adapter` only flips the static
`active_adapter` attribute of each Linear, so switching never touches base weights (it retraces instead).

Targets (`LoraSpec.target_modules`) are checkpoint module names, matched in full (never PEFT's suffix match,
which would also hit the vision tower's `q_proj`):
  * the original layout, e.g. `model.layers.{i}.self_attn.q_proj`, `model.mm_projector.readout.0`;
  * the transformers-native layout, e.g. `model.language_model.layers.3.mlp.up_proj`, `model.projector.readout.2`;
  * `{i}` stands for any layer index; an explicit number picks one layer;
  * `re:<regex>` is a Python regex full-matched against both layouts' names.
Every target must match at least one Linear module, else `AdapterError` names it. The module table is
`cogstream_jax.weights.keys` (no second table); adapters are identified by original-layout names everywhere
outside the model (adapter files, PEFT conversion).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cogstream_jax.config import ModelConfig
from cogstream_jax.errors import WeightError
from cogstream_jax.model.layers import Linear
from cogstream_jax.weights.keys import LLM_LAYER, LLM_LORA_LEAVES, Layout, module_entries

#: module kinds LoRA can wrap (Linear layers; not the patch embedding, norms or the embedding table)
LINEAR_KINDS = ("linear", "linear_nobias")
LANGUAGE_MODULE = "language_module"
FULL_MODULE = "full_module"


class AdapterError(WeightError):
    """An adapter spec, name or adapter directory is invalid for this model."""


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """PEFT `LoraConfig` equivalent: rank, alpha (scale = alpha / r), dropout on A's input, target modules."""

    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not isinstance(self.r, int) or self.r <= 0:
            raise AdapterError(f"LoraSpec.r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise AdapterError(f"LoraSpec.alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"LoraSpec.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise AdapterError(f"LoraSpec.target_modules must be non-empty strings, got {self.target_modules!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def language_module_spec(config: ModelConfig, r: int = 8, alpha: float = 16.0, dropout: float = 0.1) -> LoraSpec:
    """CogReasoner's `language_module`: q/k/v/o/gate/up/down of every LLM layer (7 x L modules)."""
    del config  # `{i}` covers every layer of whatever depth the config has
    rels = [rel for rel, _ in LLM_LAYER if rel.rsplit(".", 1)[-1] in LLM_LORA_LEAVES]
    return LoraSpec(r, alpha, dropout, tuple(f"model.layers.{{i}}.{rel}" for rel in rels))


def full_module_spec(config: ModelConfig, r: int = 8, alpha: float = 16.0, dropout: float = 0.1) -> LoraSpec:
    """CogReasoner's `full_module`: the language targets plus the projector's readout.0 and readout.2."""
    base = language_module_spec(config, r, alpha, dropout)
    return dataclasses.replace(base, target_modules=base.target_modules
                               + ("model.mm_projector.readout.0", "model.mm_projector.readout.2"))


# ---------------------------------------------------------------------------------------------- targets
def _target_regex(target: str) -> re.Pattern:
    if target.startswith("re:"):
        try:
            return re.compile(target[3:])
        except re.error as e:
            raise AdapterError(f"LoraSpec.target_modules: invalid regex {target!r}: {e}") from None
    return re.compile(re.escape(target).replace(re.escape("{i}"), r"\d+"))


def resolve_targets(config: ModelConfig, spec: LoraSpec, layout: Layout = "original") -> dict[str, str]:
    """Our module path -> checkpoint module name (in `layout`) of every module the spec targets, checkpoint order."""
    entries = list(module_entries(config))
    matched: set[str] = set()
    for target in spec.target_modules:
        pattern = _target_regex(target)
        hits = [e for e in entries if any(pattern.fullmatch(e.hf_module(layout)) for layout in ("original", "native"))]
        if not hits:
            raise AdapterError(f"LoraSpec.target_modules: {target!r} matches no module of this model "
                               f"(e.g. 'model.layers.{{i}}.self_attn.q_proj', 'model.mm_projector.readout.0')")
        not_linear = [e.hf_module("original") for e in hits if e.kind not in LINEAR_KINDS]
        if not_linear:
            raise AdapterError(f"LoraSpec.target_modules: {target!r} matches non-Linear module(s) "
                               f"{', '.join(not_linear[:5])}; LoRA wraps Linear layers only")
        matched.update(e.our_module for e in hits)
    return {e.our_module: e.hf_module(layout) for e in entries if e.our_module in matched}


# ---------------------------------------------------------------------------------------------- model access
def _linears(model: nnx.Module) -> dict[str, Linear]:
    """Our module path -> Linear, over the whole model."""
    return {".".join(str(p) for p in path): mod for path, mod in nnx.iter_modules(model) if isinstance(mod, Linear)}


def _specs(model: nnx.Module) -> dict[str, LoraSpec]:
    return dict(getattr(model, "lora_specs", ()))


def _set_specs(model: nnx.Module, specs: Mapping[str, LoraSpec]) -> None:
    # a tuple of frozen dataclasses stays static graph data (hashable, as jit needs for the graphdef)
    model.lora_specs = tuple(sorted(specs.items()))


def adapter_names(model: nnx.Module) -> tuple[str, ...]:
    """Names of the adapters the model holds, sorted."""
    return tuple(sorted(_specs(model)))


def adapter_spec(model: nnx.Module, name: str) -> LoraSpec:
    specs = _specs(model)
    if name not in specs:
        raise AdapterError(f"adapter {name!r} not found; the model holds {list(specs) or 'no adapters'}")
    return specs[name]


def active_adapter(model: nnx.Module) -> str | None:
    """The adapter set by `set_adapter` (None = base model)."""
    return getattr(model, "lora_active", None)


def _adapted(model: nnx.Module, name: str, layout: Layout = "original") -> dict[str, tuple[str, Linear]]:
    """Our module path -> (checkpoint module name, Linear) for the modules carrying adapter `name`."""
    targets = resolve_targets(model.config, adapter_spec(model, name), layout)
    linears = _linears(model)
    return {path: (hf, linears[path]) for path, hf in targets.items()}


# ---------------------------------------------------------------------------------------------- lifecycle
def add_adapter(model: nnx.Module, name: str, spec: LoraSpec, *, rngs: nnx.Rngs | None = None, seed: int = 0,
                dtype: Any = jnp.float32) -> None:
    """Create adapter `name` on every target (A Kaiming-uniform, B = 0, so the model is unchanged); not activated.

    A and B follow the base kernel onto its mesh (replicated: they are small), so sharded models keep working.
    """
    if not name or not isinstance(name, str) or "/" in name:
        raise AdapterError(f"adapter name must be a non-empty string without '/', got {name!r}")
    specs = _specs(model)
    if name in specs:
        raise AdapterError(f"adapter {name!r} already exists; delete_adapter it first")
    targets = resolve_targets(model.config, spec)
    rngs = rngs or nnx.Rngs(seed)
    linears = _linears(model)
    for path in targets:
        linear = linears[path]
        linear.add_adapter(name, spec.r, spec.alpha, spec.dropout, path, rngs=rngs, dtype=dtype)
        _follow_kernel_mesh(linear, name)
    specs[name] = spec
    _set_specs(model, specs)


def _follow_kernel_mesh(linear: Linear, name: str) -> None:
    sharding = linear.base_sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        weights = linear.adapters[name]
        for var in (weights.lora_a, weights.lora_b):
            var.set_value(jax.device_put(var[...], replicated))


def set_adapter(model: nnx.Module, name: str | None) -> None:
    """Activate adapter `name` (None = base model); modules without that adapter run as base."""
    if name is not None:
        adapter_spec(model, name)  # raises for unknown names
    for linear in _linears(model).values():
        linear.active_adapter = name if name is not None and name in linear.adapters else None
    model.lora_active = name


def delete_adapter(model: nnx.Module, name: str) -> None:
    """Remove adapter `name` (its weights are discarded, base weights untouched)."""
    for _, linear in _adapted(model, name).values():
        del linear.adapters[name]
        if linear.active_adapter == name:
            linear.active_adapter = None
    specs = _specs(model)
    del specs[name]
    _set_specs(model, specs)
    if active_adapter(model) == name:
        model.lora_active = None


def merge_adapter(model: nnx.Module, name: str) -> None:
    """Fold adapter `name` into the base kernels (W += alpha/r * A @ B in fp32) and remove it.

    Other adapters stay, now on top of the merged base (as PEFT's merge_and_unload would leave them).
    """
    for module, linear in _adapted(model, name).values():
        if linear.quant is not None:
            raise AdapterError(f"{module}: the base kernel is stored quantized ({linear.quant}); merge adapters into "
                               "an unquantized base")
        weights = linear.adapters[name]
        kernel = linear.kernel[...]
        delta = (weights.lora_a[...].astype(jnp.float32) @ weights.lora_b[...].astype(jnp.float32)) * weights.scale
        merged = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
        linear.kernel.set_value(jax.device_put(merged, kernel.sharding))  # keep the base's placement
    delete_adapter(model, name)


# ---------------------------------------------------------------------------------------------- tensors
def _is_adapter_param(name: str):
    def predicate(path, var) -> bool:
        return isinstance(var, nnx.LoRAParam) and any(
            str(a) == "adapters" and str(b) == name for a, b in zip(path[:-1], path[1:]))
    return predicate


def lora_state(model: nnx.Module, name: str) -> nnx.State:
    """The nnx.State of adapter `name`'s LoRAParams (what training optimises)."""
    adapter_spec(model, name)
    return nnx.state(model, _is_adapter_param(name))


def lora_filter(name: str):
    """An nnx filter selecting adapter `name`'s LoRAParams (for nnx.Optimizer(wrt=...) / nnx.DiffState)."""
    return _is_adapter_param(name)


def adapter_variables(model: nnx.Module, name: str, layout: Layout = "original"
                      ) -> dict[str, tuple[nnx.LoRAParam, nnx.LoRAParam]]:
    """Checkpoint module name (in `layout`) -> (A variable, B variable) of adapter `name`, in checkpoint order."""
    out = {}
    for hf, linear in _adapted(model, name, layout).values():
        weights = linear.adapters[name]
        out[hf] = (weights.lora_a, weights.lora_b)
    return out


def adapter_tensors(model: nnx.Module, name: str, layout: Layout = "original"
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Checkpoint module name (in `layout`) -> (A [in, r], B [r, out]) on the host, in checkpoint order.

    PEFT keys follow as `base_model.model.<native name>.lora_A.weight = A.T`, `.lora_B.weight = B.T`.
    """
    return {hf: tuple(np.asarray(jax.device_get(v[...])) for v in pair)
            for hf, pair in adapter_variables(model, name, layout).items()}


def set_adapter_tensors(model: nnx.Module, name: str, tensors: Mapping[str, tuple[Any, Any]] | Iterable,
                        source: str = "<tensors>", layout: Layout = "original") -> None:
    """Fill adapter `name` from {checkpoint module name: (A [in, r], B [r, out])}, strictly (all and only its modules).

    Values keep each parameter's dtype and sharding.
    """
    tensors = dict(tensors)
    adapted = adapter_variables(model, name, layout)
    missing = sorted(set(adapted) - set(tensors))
    unknown = sorted(set(tensors) - set(adapted))
    problems = []
    if missing:
        problems.append(f"missing module(s): {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if unknown:
        problems.append(f"unknown module(s): {', '.join(unknown[:5])}" + (" ..." if len(unknown) > 5 else ""))
    for hf in sorted(set(adapted) & set(tensors)):
        for label, var, value in zip("AB", adapted[hf], tensors[hf]):
            if tuple(np.shape(value)) != tuple(var.shape):
                problems.append(f"{hf} lora {label}: shape {tuple(np.shape(value))}, expected {tuple(var.shape)}")
    if problems:
        raise AdapterError(f"{source}: adapter {name!r} tensors do not match the model: " + "; ".join(problems))
    for hf, pair in adapted.items():
        for var, value in zip(pair, tensors[hf]):
            old = var[...]
            var.set_value(jax.device_put(jnp.asarray(value, dtype=old.dtype), old.sharding))
