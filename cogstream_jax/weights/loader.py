"""`load_pretrained`: config.json + safetensors (either layout) or our orbax folder -> a ready `VideoLlama3`.

The model is first built abstractly (`nnx.eval_shape`: shapes, dtypes and logical axes, no memory). Keys and
shapes are checked against the checkpoint headers before any tensor is read, so a wrong checkpoint fails in
milliseconds with one error listing every problem. Then tensors stream one at a time: read into a fresh host
buffer, converted to our layout, cast to the requested dtype, and placed straight onto the default device or the
mesh sharding that the parameter's logical axes imply. The host never holds more than about one tensor beyond the
model itself.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from cogstream_jax.config import ModelConfig
from cogstream_jax.errors import ConfigError, WeightError
from cogstream_jax.model.videollama3 import VideoLlama3
from cogstream_jax.sharding import DEFAULT_RULES, variable_sharding
from cogstream_jax.weights.assign import StrictAssigner, coverage_error, param_leaves
from cogstream_jax.weights.keys import TensorEntry, detect_layout, hf_key_table
from cogstream_jax.weights.safetensors_io import Checkpoint, TensorInfo

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
Rules = Mapping[str, tuple[str, ...] | None]
Placer = Callable[[np.ndarray, nnx.Variable], jax.Array]


def resolve_dtype(dtype: Any, field: str = "dtype") -> Any:
    """'float32' | 'bfloat16' (or the jnp dtype itself) -> jnp dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"{field}={dtype!r}: expected one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    if jnp.dtype(dtype) not in {jnp.dtype(d) for d in DTYPES.values()}:
        raise ConfigError(f"{field}={dtype!r}: expected one of {sorted(DTYPES)}")
    return dtype


def abstract_model(config: ModelConfig, param_dtype: Any, dtype: Any) -> VideoLlama3:
    """The model with `ShapeDtypeStruct` leaves: allocates nothing, even for 7B."""
    return nnx.eval_shape(lambda: VideoLlama3(config, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype))


def make_placer(param_dtype: Any, mesh: Mesh | None, rules: Rules = DEFAULT_RULES) -> Placer:
    """Host array -> device array of the parameter's dtype, on the mesh sharding its axes imply (if a mesh)."""
    np_dtype = np.dtype(param_dtype)

    def place(array: np.ndarray, var: nnx.Variable) -> jax.Array:
        host = array.astype(np_dtype, copy=False)
        if mesh is None:
            return jax.device_put(host)
        return jax.device_put(host, variable_sharding(var, mesh, rules))

    return place


def load_pretrained(path: str | os.PathLike, dtype: Any = "float32", mesh: Mesh | None = None,
                    rules: Rules = DEFAULT_RULES, compute_dtype: Any = None) -> VideoLlama3:
    """Load a VideoLLaMA3 checkpoint folder.

    `path`: a folder with config.json and `model.safetensors` or sharded safetensors + index, in the original
    (VideoLLaMA3 / CogStream) or transformers-native layout (detected from the keys); or a folder written by
    `python -m convert.hf_to_orbax`. `dtype`: parameter dtype ("float32" or "bfloat16"), cast tensor by tensor.
    `compute_dtype`: activation dtype (defaults to `dtype`; softmax, norms and logits stay fp32 regardless).
    `mesh`: place each parameter with the `NamedSharding` of its logical axes under `rules`.
    """
    from cogstream_jax import remote
    from cogstream_jax.weights import orbax_io

    path = os.fspath(path)
    if not remote.isdir(path):
        raise WeightError(f"{path}: checkpoint folder not found")
    param_dtype = resolve_dtype(dtype)
    compute = resolve_dtype(compute_dtype, "compute_dtype") if compute_dtype is not None else param_dtype
    config = ModelConfig.from_hf_config(path)
    graphdef, state = nnx.split(abstract_model(config, param_dtype, compute))
    if orbax_io.is_orbax_folder(path):
        orbax_io.restore_params(path, config, state, mesh, rules)
    else:
        stream_safetensors(Checkpoint(path), config, state, make_placer(param_dtype, mesh, rules))
    return nnx.merge(graphdef, state)


def stream_safetensors(checkpoint: Checkpoint, config: ModelConfig, state: nnx.State, place: Placer) -> None:
    """Fill the Param leaves of `state` from a checkpoint of either layout, one tensor at a time."""
    table = hf_key_table(config, detect_layout(checkpoint.keys()))
    leaves = param_leaves(state)
    check_headers(checkpoint.path, table, leaves, checkpoint.tensors)
    assigner = StrictAssigner(state, table, checkpoint.path, place)
    for key, tensor in checkpoint.iter_tensors():
        assigner.add(key, tensor)
        del tensor
    assigner.finish()


def check_headers(source: str, table: Mapping[str, TensorEntry], leaves: Mapping[tuple[str, ...], nnx.Variable],
                  tensors: Mapping[str, TensorInfo]) -> None:
    """Strict coverage from the headers alone (nothing is read): unknown, missing, wrong shape; one error."""
    unknown = [k for k in tensors if k not in table]
    missing = [k for k in table if k not in tensors]
    mismatched = []
    converted: dict[tuple, tuple[int, ...]] = {}  # the transform depends only on kind, leaf and shape
    for key, info in tensors.items():
        entry = table.get(key)
        if entry is None:
            continue
        signature = (entry.module.kind, entry.our_leaf, info.shape)
        if signature not in converted:
            converted[signature] = jax.eval_shape(entry.to_ours, jax.ShapeDtypeStruct(info.shape, jnp.float32)).shape
        ours = converted[signature]
        expected = tuple(leaves[entry.our_path].get_value().shape)
        if tuple(ours) != expected:
            mismatched.append(f"{key} in {os.path.basename(info.file)}: checkpoint {info.shape} -> {tuple(ours)}, "
                              f"model expects {expected}")
    error = coverage_error(source, unknown, missing, mismatched)
    if error is not None:
        raise error
