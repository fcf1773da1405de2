"""`save_pretrained`: a model -> config.json + (sharded) safetensors in the original or transformers-native layout.

The safetensors header is computed from the parameters' shapes alone, then tensors are fetched from the devices,
converted to the checkpoint layout and written one at a time, so export needs about one tensor of host memory
beyond the model. The native layout loads in `transformers.VideoLlama3ForConditionalGeneration.from_pretrained`;
the original layout is what VideoLLaMA3 / CogStream ship.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from cogstream_jax import remote
from cogstream_jax.io_utils import as_path, atomic_write_json
from cogstream_jax.config import ModelConfig
from cogstream_jax.errors import ConfigError
from cogstream_jax.weights.assign import export_hf_tensors, param_leaves
from cogstream_jax.weights.keys import Layout, hf_key_table
from cogstream_jax.weights.safetensors_io import TensorSpec, write_checkpoint

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_DTYPE_NAMES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}


def export_specs(model: nnx.Module, layout: Layout, dtype: Any = None) -> list[TensorSpec]:
    """Checkpoint name, shape and dtype of every tensor, in checkpoint order, without touching any data."""
    config: ModelConfig = model.config
    leaves = param_leaves(nnx.state(model, nnx.Param))
    specs = []
    for key, entry in hf_key_table(config, layout).items():
        value = leaves[entry.our_path].get_value()
        shape = jax.eval_shape(lambda v: entry.to_hf(v, config), jax.ShapeDtypeStruct(value.shape, value.dtype)).shape
        specs.append(TensorSpec(key, tuple(shape), np.dtype(dtype or value.dtype)))
    return specs


def save_pretrained(model: nnx.Module, out_dir: str | os.PathLike, layout: Layout = "original",
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: str | None = None) -> list[str]:
    """Write config.json + safetensors (+ index when sharded); returns the weight file names.

    `dtype`: "float32" | "bfloat16" | "float16" to cast on export; default keeps each parameter's dtype.
    """
    if layout not in ("original", "native"):
        raise ConfigError(f"layout={layout!r}: expected 'original' or 'native'")
    if dtype is not None and dtype not in _DTYPE_NAMES:
        raise ConfigError(f"dtype={dtype!r}: expected one of {sorted(_DTYPE_NAMES)}")
    np_dtype = None if dtype is None else np.dtype(_DTYPE_NAMES[dtype])
    out_dir = remote.absolute(out_dir)
    as_path(out_dir).mkdir(parents=True, exist_ok=True)
    specs = export_specs(model, layout, np_dtype)
    tensors = export_hf_tensors(model, layout)

    def produce(spec: TensorSpec) -> np.ndarray:
        key, array = next(tensors)
        assert key == spec.name, (key, spec.name)  # both walk the same key table in the same order
        return array.astype(spec.dtype, copy=False)

    files = write_checkpoint(out_dir, specs, produce, max_shard_bytes)
    hf_config = model.config.to_hf_config(layout)
    written_dtype = str(specs[0].dtype) if len({s.dtype for s in specs}) == 1 else "float32"
    hf_config["torch_dtype" if layout == "original" else "dtype"] = written_dtype
    atomic_write_json(os.path.join(out_dir, "config.json"), hf_config)
    return files
