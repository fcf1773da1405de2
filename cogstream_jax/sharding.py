"""Device meshes and logical-axis sharding rules.

Every parameter carries logical axis names (`axes` metadata set in `cogstream_jax.model.layers`). One rules
table maps logical names to the physical mesh axes ("data", "fsdp", "tensor"), so the same model runs on one
CPU, a GPU host or a TPU pod by changing flags only. A logical axis whose dimension does not divide the mesh
axes it maps to is replicated instead (tiny models on big meshes stay correct).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cogstream_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

#: logical axis -> mesh axes (None = replicated). FSDP shards the model dimension, tensor parallelism the
#: heads / MLP / vocabulary dimension; activations' batch goes over data and fsdp.
DEFAULT_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "norm": None,
    "vit_embed": ("fsdp",),
    "vit_heads": ("tensor",),
    "vit_mlp": ("tensor",),
    "vit_patch": None,
    "vit_norm": None,
    "lora_rank": None,
}


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Mesh shape over (data, fsdp, tensor); -1 in one position takes the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    @classmethod
    def parse(cls, text: str) -> "MeshSpec":
        """'data=2,fsdp=4,tensor=1' or '2,4,1'."""
        try:
            if "=" in text:
                kv = dict(part.split("=") for part in text.split(","))
                unknown = set(kv) - set(MESH_AXES)
                if unknown:
                    raise ConfigError(f"--mesh: unknown axis {sorted(unknown)}; axes are {MESH_AXES}")
                return cls(**{k: int(v) for k, v in kv.items()})
            return cls(*(int(x) for x in text.split(",")))
        except (ValueError, TypeError):
            raise ConfigError(f"--mesh {text!r}: expected e.g. 'data=2,fsdp=4,tensor=1' or '2,4,1'") from None

    def shape(self, n_devices: int) -> tuple[int, int, int]:
        dims = [self.data, self.fsdp, self.tensor]
        if dims.count(-1) > 1:
            raise ConfigError(f"--mesh {dims}: at most one axis may be -1")
        if any(d == 0 or d < -1 for d in dims):
            raise ConfigError(f"--mesh {dims}: axis sizes must be positive (or -1 for the remaining devices)")
        known = math.prod(d for d in dims if d != -1)
        if -1 in dims:
            if n_devices % known:
                raise ConfigError(f"--mesh {dims}: {n_devices} devices are not divisible by {known}")
            dims[dims.index(-1)] = n_devices // known
        if math.prod(dims) != n_devices:
            raise ConfigError(f"--mesh data={dims[0]},fsdp={dims[1]},tensor={dims[2]} needs {math.prod(dims)} "
                              f"devices but {n_devices} are available")
        return tuple(dims)


def make_mesh(spec: MeshSpec | str | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all (global) devices."""
    if isinstance(spec, str):
        spec = MeshSpec.parse(spec)
    spec = spec or MeshSpec()
    devices = list(devices if devices is not None else jax.devices())
    shape = spec.shape(len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, tuple[str, ...] | None] = DEFAULT_RULES,
                    units: Mapping[str, int] | Sequence[tuple[str, int]] | None = None) -> PartitionSpec:
    """PartitionSpec for one array; mesh axes of size 1, reused axes and indivisible dims are dropped.

    `units` {logical axis: size} (or its items): that dimension is only split in whole multiples of `size`
    (attention heads: a GQA model whose kv heads do not divide the tensor axis keeps them whole, replicated, instead
    of cutting a head across ranks)."""
    if not axes:
        return PartitionSpec()
    units = dict(units or ())
    used: set[str] = set()
    out = []
    for name, dim in zip(axes, shape):
        mesh_axes = tuple(a for a in (rules.get(name) or ()) if mesh.shape[a] > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in mesh_axes) * units.get(name, 1)
        if not mesh_axes or dim % size:
            out.append(None)
            continue
        used.update(mesh_axes)
        out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    meta = var.get_metadata()
    return NamedSharding(mesh, logical_to_spec(meta.get("axes"), var.shape, mesh, rules, meta.get("units")))


def check_heads(num_heads: int, mesh: Mesh, what: str = "query heads") -> None:
    """Tensor parallelism splits attention by heads: the tensor axis must divide the model's query heads."""
    tensor = mesh.shape.get("tensor", 1)
    if num_heads % tensor:
        ok = [n for n in range(1, num_heads + 1) if num_heads % n == 0]
        raise ConfigError(f"--mesh tensor={tensor} does not divide the model's {num_heads} {what}; use tensor in "
                          f"{ok}")


def constrain_rows(x: jax.Array, mesh: Mesh | None, last: str | None = None, *, rows_mapped: bool = False,
                   units: Mapping[str, int] | None = None) -> jax.Array:
    """Pin activations [B, ..., last]: rows over (data, fsdp), the last dimension by the rules of the logical axis
    `last` (e.g. "mlp" over tensor), the rest unsplit. Without a pin XLA may keep FSDP weights sharded along the
    model dimension and gather the ROWS instead (every device then holds, and all-reduces, every row's MLP
    activations: seen in a 7B stage-2 compile at fsdp=16). Rows that do not divide are left to XLA, unless
    `rows_mapped`: x is one row of `jax.vmap(..., spmd_axis_name=BATCH_AXES)`, which adds the row split itself,
    so x's own axes are pinned unsplit."""
    if mesh is None:
        return x
    axes = ["batch"] + [None] * (x.ndim - 2) + [last]
    spec = logical_to_spec(axes, x.shape, mesh, units=units)
    rows = tuple(a for a in DEFAULT_RULES["batch"] if mesh.shape.get(a, 1) > 1)
    if not rows_mapped and rows and (not spec or spec[0] is None):
        return x  # rows do not divide: XLA decides
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.State:
    """A state-shaped tree of NamedShardings (for jit in/out shardings and orbax restore targets)."""
    return jax.tree.map(lambda v: variable_sharding(v, mesh, rules), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> None:
    """Move every variable of a concrete model onto the mesh according to its logical axes, in place."""
    state = nnx.state(model)
    for _, var in nnx.to_flat_state(state):
        if isinstance(var, nnx.Variable) and hasattr(var, "shape"):
            var.set_value(jax.device_put(var[...], variable_sharding(var, mesh, rules)))
    nnx.update(model, state)

