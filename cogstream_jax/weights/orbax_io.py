"""Our own checkpoint folder: an orbax PyTree checkpoint of the parameters + config.json + `cogstream_meta.json`.

Why orbax: it restores every array straight into its target sharding and dtype (topology-agnostic), which is what
multi-host TPU/GPU training and serving want; safetensors stays the interchange format.
Layout of the folder:
  params/               orbax StandardCheckpointer item; a flat {dotted NNX path: array} dict
  config.json           transformers-native layout (lossless for both token ids)
  cogstream_meta.json   written last, so an interrupted save is never mistaken for a complete one
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from cogstream_jax import remote
from cogstream_jax.io_utils import as_path, atomic_write_bytes, atomic_write_json
from cogstream_jax.config import ModelConfig
from cogstream_jax.errors import WeightError
from cogstream_jax.sharding import DEFAULT_RULES, variable_sharding
from cogstream_jax.weights.assign import coverage_error, param_leaves

META_NAME = "cogstream_meta.json"
PARAMS_DIR = "params"
FORMAT = "cogstream-jax/orbax-params"
FORMAT_VERSION = 1
#: bytes in flight while saving / restoring: bounds the transient host memory on top of the model (7B on 24 GB)
CONCURRENT_GB = 2
#: small files of a HF model folder worth carrying along (tokenizer, processor, generation defaults)
AUX_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
             "added_tokens.json", "special_tokens_map.json", "chat_template.json", "chat_template.jinja",
             "preprocessor_config.json", "processor_config.json")


def _checkpointer():
    """Synchronous (the caller waits anyway) with bounded concurrency."""
    import orbax.checkpoint as ocp

    return ocp.Checkpointer(ocp.StandardCheckpointHandler(save_concurrent_gb=CONCURRENT_GB,
                                                          restore_concurrent_gb=CONCURRENT_GB))


def is_orbax_folder(path: str) -> bool:
    return remote.isfile(os.path.join(path, META_NAME))


def read_meta(path: str) -> dict[str, Any]:
    import json

    meta_path = os.path.join(path, META_NAME)
    try:
        with remote.open_file(meta_path, "r") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise WeightError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise WeightError(f"{meta_path}: field 'format' must be {FORMAT!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise WeightError(f"{meta_path}: field 'version' is {meta.get('version')!r}; this code reads "
                          f"version {FORMAT_VERSION}")
    return meta


def _flat_params(state: nnx.State) -> dict[str, nnx.Variable]:
    return {".".join(path): var for path, var in param_leaves(state).items()}


def save_orbax(model: nnx.Module, out_dir: str | os.PathLike, *, source: str | None = None,
               copy_aux_from: str | None = None) -> None:
    """Write `model`'s parameters (as they are: dtype and sharding) into our orbax folder format."""
    import orbax.checkpoint as ocp

    out_dir = remote.absolute(out_dir)
    as_path(out_dir).mkdir(parents=True, exist_ok=True)
    meta_path = os.path.join(out_dir, META_NAME)
    as_path(meta_path).unlink(missing_ok=True)
    flat = {key: var.get_value() for key, var in _flat_params(nnx.state(model, nnx.Param)).items()}
    _checkpointer().save(as_path(out_dir) / PARAMS_DIR, args=ocp.args.StandardSave(flat), force=True)
    config: ModelConfig = model.config
    atomic_write_json(os.path.join(out_dir, "config.json"), config.to_hf_config("native"))
    if copy_aux_from:
        for name in AUX_FILES:
            src = os.path.join(copy_aux_from, name)
            if remote.isfile(src):
                atomic_write_bytes(os.path.join(out_dir, name), as_path(src).read_bytes())
    dtypes = sorted({str(np.dtype(v.dtype)) for v in flat.values()})
    atomic_write_json(meta_path, {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config_fingerprint": config.fingerprint(),
        "param_dtypes": dtypes,
        "num_params": int(sum(np.prod(v.shape) for v in flat.values())),
        "num_tensors": len(flat),
        "source": source,
        "created_by": "cogstream_jax.weights.orbax_io.save_orbax",
    })


def restore_params(path: str, config: ModelConfig, state: nnx.State, mesh: Mesh | None,
                   rules: Mapping = DEFAULT_RULES) -> None:
    """Fill the (abstract) Param leaves of `state` from our orbax folder, casting to their dtype, on `mesh`."""
    import orbax.checkpoint as ocp

    meta = read_meta(path)
    if meta.get("config_fingerprint") != config.fingerprint():
        raise WeightError(f"{os.path.join(path, 'config.json')}: does not match the config the parameters were "
                          f"saved with (fingerprint {config.fingerprint()} vs {meta.get('config_fingerprint')} in "
                          f"{META_NAME})")
    params_dir = as_path(path) / PARAMS_DIR
    checkpointer = _checkpointer()
    try:
        stored = dict(checkpointer.metadata(params_dir).item_metadata.tree)
    except Exception as e:  # orbax raises many types for missing/corrupt folders
        raise WeightError(f"{params_dir}: unreadable orbax checkpoint ({type(e).__name__}: {e})") from None
    expected = _flat_params(state)
    mismatched = [f"{k}: checkpoint {tuple(stored[k].shape)}, model expects {tuple(v.get_value().shape)}"
                  for k, v in expected.items() if k in stored and tuple(stored[k].shape) != tuple(v.get_value().shape)]
    error = coverage_error(params_dir, [k for k in stored if k not in expected],
                           [k for k in expected if k not in stored], mismatched)
    if error is not None:
        raise error
    device = SingleDeviceSharding(jax.devices()[0])
    target = {k: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype,
                                      sharding=device if mesh is None else variable_sharding(v, mesh, rules))
              for k, v in expected.items()}
    try:
        restored = checkpointer.restore(params_dir, args=ocp.args.StandardRestore(target))
    except (ValueError, OSError) as e:
        raise WeightError(f"{params_dir}: could not restore ({e})") from None
    for key, var in expected.items():
        var.set_value(restored.pop(key))
