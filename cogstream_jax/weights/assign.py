"""Put converted tensors into (abstract or concrete) NNX parameter states, strictly.

Shared by the safetensors importer, the orbax loader and tests: every table entry must be filled exactly once
and with the shape the model expects; unknown keys, missing keys and shape mismatches are reported together.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import jax
import numpy as np
from flax import nnx

from cogstream_jax.errors import WeightError
from cogstream_jax.weights.keys import Layout, TensorEntry, hf_key_table


def param_leaves(state: nnx.State) -> dict[tuple[str, ...], nnx.Variable]:
    """Flat {path of strings: Variable} over the Param leaves of a state."""
    flat = {}
    for path, var in nnx.to_flat_state(state):
        flat[tuple(str(p) for p in path)] = var
    return flat


class StrictAssigner:
    """Collects tensors for one model and checks coverage once at the end.

    `place(array, variable)` decides where an array goes (host, one device, or a mesh sharding).
    """

    def __init__(self, state: nnx.State, table: Mapping[str, TensorEntry], source: str,
                 place: Callable[[np.ndarray, nnx.Variable], jax.Array]):
        self.leaves = param_leaves(state)
        self.table = table
        self.source = source
        self.place = place
        self.filled: set[str] = set()
        self.unknown: list[str] = []
        self.mismatched: list[str] = []

    def expected_shape(self, key: str) -> tuple[int, ...] | None:
        entry = self.table.get(key)
        return None if entry is None else tuple(self.leaves[entry.our_path].shape)

    def add(self, key: str, tensor: np.ndarray) -> None:
        entry = self.table.get(key)
        if entry is None or entry.our_path not in self.leaves:
            self.unknown.append(key)
            return
        var = self.leaves[entry.our_path]
        value = entry.to_ours(tensor)
        if tuple(value.shape) != tuple(var.shape):
            self.mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} -> {tuple(value.shape)}, "
                                   f"model expects {tuple(var.shape)}")
            return
        var.set_value(self.place(value, var))
        self.filled.add(key)

    def finish(self) -> None:
        error = coverage_error(self.source, self.unknown, sorted(set(self.table) - self.filled), self.mismatched)
        if error is not None:
            raise error


def coverage_error(source: str, unknown: list[str], missing: list[str], mismatched: list[str]) -> WeightError | None:
    """One error listing every unknown key, missing key and shape mismatch (None when there are none)."""
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown key(s): {', '.join(sorted(unknown)[:10])}"
                        + (" ..." if len(unknown) > 10 else ""))
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(sorted(missing)[:10])}"
                        + (" ..." if len(missing) > 10 else ""))
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {'; '.join(mismatched[:10])}")
    if not problems:
        return None
    return WeightError(f"{source}: checkpoint does not match the model config: " + " | ".join(problems))


def assign_hf_tensors(model: nnx.Module, tensors: Iterable[tuple[str, np.ndarray]], layout: Layout,
                      source: str = "<tensors>") -> None:
    """Load (key, tensor) pairs of a checkpoint layout into a concrete model in place (tests, small models)."""
    import jax.numpy as jnp

    state = nnx.state(model, nnx.Param)
    assigner = StrictAssigner(state, hf_key_table(model.config, layout), source,
                              lambda a, var: jnp.asarray(a, dtype=var.dtype))
    for key, tensor in tensors:
        assigner.add(key, np.asarray(tensor))
    assigner.finish()
    nnx.update(model, state)


def export_hf_tensors(model: nnx.Module, layout: Layout):
    """Yield (checkpoint key, numpy array) for every parameter, in checkpoint order."""
    leaves = param_leaves(nnx.state(model, nnx.Param))
    for key, entry in hf_key_table(model.config, layout).items():
        yield key, entry.to_hf(np.asarray(jax.device_get(leaves[entry.our_path][...])), model.config)
