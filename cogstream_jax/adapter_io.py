"""The adapter directory format shared by training, evaluation and conversion.

    <dir>/adapter_meta.json   {format, name, r, alpha, dropout, target_modules, base_fingerprint, created_by}
    <dir>/lora/               orbax checkpoint of the LoRA tensors only:
                              {<original module name split on '.'>: {"lora_a": [in, r], "lora_b": [r, out]}}
                              e.g. tree["model"]["layers"]["0"]["self_attn"]["q_proj"]["lora_a"]

Tensors are keyed by original-layout checkpoint names (not our NNX paths) so converters (PEFT export/import)
need no knowledge of our module tree. `base_fingerprint` is `ModelConfig.fingerprint()`: an adapter refuses to
load onto a different architecture. Directories are written into a temp sibling and renamed into place; on an
object store (`gs://...`, no rename there) the tensors are written in place and `adapter_meta.json` last, so a
folder without it (an interrupted write) is never loaded as an adapter and is replaced by the next write.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import uuid
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from cogstream_jax import __version__
from cogstream_jax.lora import (AdapterError, LoraSpec, adapter_names, adapter_spec, adapter_variables,
                                add_adapter, delete_adapter, set_adapter_tensors)
from cogstream_jax.io_utils import as_path, is_url
from cogstream_jax.multihost import broadcast_from_primary

META_FILE = "adapter_meta.json"
TENSOR_DIR = "lora"
FORMAT = "cogstream-jax-lora-adapter/1"
_META_FIELDS = ("name", "r", "alpha", "dropout", "target_modules", "base_fingerprint", "created_by")


@dataclasses.dataclass(frozen=True)
class AdapterMeta:
    name: str
    spec: LoraSpec
    base_fingerprint: str
    created_by: str

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "name": self.name, "r": self.spec.r, "alpha": self.spec.alpha,
                "dropout": self.spec.dropout, "target_modules": list(self.spec.target_modules),
                "base_fingerprint": self.base_fingerprint, "created_by": self.created_by}


def read_json_object(path: pathlib.Path) -> dict[str, Any]:
    """A JSON file that must hold an object (AdapterError naming the file otherwise)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: unreadable JSON: {e}") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return raw


def read_adapter_meta(directory: str | os.PathLike) -> AdapterMeta:
    """Parse and validate `<dir>/adapter_meta.json` (clear errors naming the file and field)."""
    directory = as_path(directory)
    path = directory / META_FILE
    if not directory.is_dir():
        raise AdapterError(f"{directory}: adapter directory does not exist")
    if not path.is_file():
        raise AdapterError(f"{path}: missing adapter metadata file (is {directory} an adapter directory?)")
    raw = read_json_object(path)
    missing = [k for k in _META_FIELDS if k not in raw]
    if missing:
        raise AdapterError(f"{path}: missing field(s) {', '.join(missing)}")
    if raw.get("format", FORMAT) != FORMAT:
        raise AdapterError(f"{path}: field 'format' is {raw['format']!r}; this version reads {FORMAT!r}")
    try:
        spec = LoraSpec(r=raw["r"], alpha=float(raw["alpha"]), dropout=float(raw["dropout"]),
                        target_modules=tuple(raw["target_modules"]))
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{path}: invalid LoRA fields: {e}") from None
    except AdapterError as e:
        raise AdapterError(f"{path}: {e}") from None
    for key in ("name", "base_fingerprint", "created_by"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise AdapterError(f"{path}: field {key!r} must be a non-empty string")
    return AdapterMeta(raw["name"], spec, raw["base_fingerprint"], raw["created_by"])


# ---------------------------------------------------------------------------------------------- tree layout
def _to_tree(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for module, (a, b) in flat.items():
        node = tree
        for part in module.split("."):
            node = node.setdefault(part, {})
        node["lora_a"], node["lora_b"] = a, b
    return tree


def _from_tree(tree: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    if "lora_a" in tree or "lora_b" in tree:
        return {prefix: (tree.get("lora_a"), tree.get("lora_b"))}
    out = {}
    for key, sub in tree.items():
        out.update(_from_tree(sub, f"{prefix}.{key}" if prefix else str(key)))
    return out


# ---------------------------------------------------------------------------------------------- save
def save_adapter(model: nnx.Module, name: str, directory: str | os.PathLike) -> pathlib.Path:
    """Write adapter `name` to `directory` atomically (replacing an existing adapter directory there)."""
    meta = AdapterMeta(name, adapter_spec(model, name), model.config.fingerprint(), created_by("save_adapter"))
    # device arrays as they are (sharded ones included): orbax writes each shard from its owner
    arrays = {hf: (a[...], b[...]) for hf, (a, b) in adapter_variables(model, name).items()}
    return write_adapter_dir(directory, meta, arrays)


def created_by(function: str) -> str:
    """The `created_by` stamp of files this package writes."""
    return f"cogstream_jax {__version__} (cogstream_jax.adapter_io.{function})"


def write_adapter_dir(directory: str | os.PathLike, meta: AdapterMeta,
                      tensors: Mapping[str, tuple[Any, Any]]) -> pathlib.Path:
    """Write {original module name: (A [in, r], B [r, out])} + metadata as an adapter directory, atomically.

    Model-free (converters use it); `save_adapter` is this plus the model's own tensors and fingerprint.
    In a multi-process run every process calls it with the same arguments (global arrays are written shard by
    shard by their owners); process 0 writes the metadata and renames the folder into place.
    """
    import orbax.checkpoint as ocp

    directory = as_path(directory)
    if is_url(directory):
        return _write_adapter_remote(directory, meta, tensors)
    if directory.exists() and any(directory.iterdir()) and not (directory / META_FILE).is_file():
        raise AdapterError(f"{directory}: exists and is not an adapter directory; refusing to replace it")
    primary = jax.process_index() == 0
    if primary:
        directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{_shared_token()}"
    try:
        # every process takes part: orbax writes each array shard from the process that owns it
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / TENSOR_DIR, _to_tree(dict(tensors)))
        failure: OSError | None = None
        if primary:
            try:
                (tmp / META_FILE).write_text(json.dumps(meta.to_json(), indent=2) + "\n")
                _replace_dir(tmp, directory)
            except OSError as exc:
                failure = exc
        # a collective in place of a plain barrier: the others learn whether process 0 succeeded instead of
        # waiting for a barrier it never reaches
        if not int(broadcast_from_primary(np.int32(failure is None))):
            if failure is not None:
                raise failure
            raise AdapterError(f"{directory}: process 0 could not write the adapter directory (see its log)")
    finally:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _write_adapter_remote(directory, meta: AdapterMeta, tensors: Mapping[str, tuple[Any, Any]]):
    """Object-store variant: drop an old adapter's metadata first (the folder is then incomplete, never a mix
    of old and new), remove the rest, write the tensors, then the metadata as the commit marker."""
    import orbax.checkpoint as ocp

    primary = jax.process_index() == 0
    failure: Exception | None = None
    if primary:
        try:
            if directory.exists():
                names = {p.name for p in directory.iterdir()}
                if names - {META_FILE, TENSOR_DIR}:
                    raise AdapterError(f"{directory}: exists and is not an adapter directory; refusing to replace it")
                if META_FILE in names:
                    (directory / META_FILE).unlink()
                if TENSOR_DIR in names:
                    (directory / TENSOR_DIR).rmtree()
            directory.mkdir(parents=True, exist_ok=True)
        except Exception as exc:  # unwritable bucket, no permission, ...
            failure = exc
    if not int(broadcast_from_primary(np.int32(failure is None))):
        if isinstance(failure, AdapterError):
            raise failure
        raise AdapterError(f"{directory}: cannot write the adapter there ({failure or 'see process 0'})")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / TENSOR_DIR, _to_tree(dict(tensors)))
    if primary:
        (directory / META_FILE).write_text(json.dumps(meta.to_json(), indent=2) + "\n")
    broadcast_from_primary(np.int32(1))  # nobody returns before the marker is written
    return directory


def _shared_token() -> str:
    """A random temp-folder token that every process of a multi-process run agrees on (process 0's)."""
    return f"{int(broadcast_from_primary(np.uint32(uuid.uuid4().int & 0xFFFFFFFF))):08x}"


def _replace_dir(new: pathlib.Path, target: pathlib.Path) -> None:
    """Rename `new` onto `target`; an old `target` is moved aside first and removed after the swap."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- load
def load_adapter(model: nnx.Module, directory: str | os.PathLike, name: str | None = None) -> str:
    """Add the adapter stored in `directory` to `model` (under `name`, default its saved name); not activated.

    Raises AdapterError when the directory is incomplete, was made for another base model, or its tensors do
    not match its own metadata. Tensors are restored with each LoRA parameter's current sharding.
    """
    import orbax.checkpoint as ocp

    directory = as_path(directory)
    meta = read_adapter_meta(directory)
    name = name or meta.name
    fingerprint = model.config.fingerprint()
    if meta.base_fingerprint != fingerprint:
        raise AdapterError(f"{directory / META_FILE}: field 'base_fingerprint' is {meta.base_fingerprint}, but the "
                           f"model's config fingerprint is {fingerprint}: this adapter was made for another base")
    tensor_dir = _tensor_dir(directory)
    if name in adapter_names(model):
        raise AdapterError(f"{directory}: the model already holds an adapter named {name!r}; pass another name "
                           "or delete_adapter it first")
    add_adapter(model, name, meta.spec)
    try:
        target = _restore_target(model, name)
        with ocp.StandardCheckpointer() as checkpointer:
            _check_stored_shapes(tensor_dir, checkpointer, target)
            restored = checkpointer.restore(tensor_dir, _to_tree(target))
        set_adapter_tensors(model, name, _from_tree(restored), source=str(tensor_dir))
    except BaseException:
        delete_adapter(model, name)
        raise
    return name


def read_adapter_tensors(directory: str | os.PathLike) -> tuple[AdapterMeta, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Model-free read: the metadata and {original module name: (A, B)} as host numpy arrays."""
    import orbax.checkpoint as ocp

    directory = as_path(directory)
    meta = read_adapter_meta(directory)
    tensor_dir = _tensor_dir(directory)
    with ocp.StandardCheckpointer() as checkpointer:
        stored = _stored_metadata(tensor_dir, checkpointer)
        target = {hf: tuple(None if m is None else np.empty(m.shape, m.dtype) for m in pair)
                  for hf, pair in stored.items()}
        if any(m is None for pair in target.values() for m in pair):
            raise AdapterError(f"{tensor_dir}: every module needs both lora_a and lora_b")
        restored = checkpointer.restore(tensor_dir, _to_tree(target))
    return meta, {hf: tuple(np.asarray(x) for x in pair) for hf, pair in _from_tree(restored).items()}


def _tensor_dir(directory: pathlib.Path) -> pathlib.Path:
    tensor_dir = directory / TENSOR_DIR
    if not tensor_dir.is_dir():
        raise AdapterError(f"{tensor_dir}: missing LoRA tensor checkpoint")
    return tensor_dir


def _stored_metadata(tensor_dir: pathlib.Path, checkpointer) -> dict[str, tuple[Any, Any]]:
    try:
        return _from_tree(checkpointer.metadata(tensor_dir).item_metadata.tree)
    except Exception as e:  # orbax raises assorted types for damaged checkpoints
        raise AdapterError(f"{tensor_dir}: unreadable LoRA checkpoint: {e}") from None


def _restore_target(model: nnx.Module, name: str) -> dict[str, tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]]:
    """ShapeDtypeStructs with the shape, dtype and sharding of the freshly added parameters."""
    return {hf: tuple(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v[...].sharding) for v in pair)
            for hf, pair in adapter_variables(model, name).items()}


def _check_stored_shapes(tensor_dir: pathlib.Path, checkpointer, expected) -> None:
    stored = _stored_metadata(tensor_dir, checkpointer)
    problems = []
    for hf in sorted(set(expected) | set(stored)):
        if hf not in stored:
            problems.append(f"missing {hf}")
        elif hf not in expected:
            problems.append(f"unexpected {hf}")
        else:
            for label, meta, want in zip("AB", stored[hf], expected[hf]):
                if meta is None or tuple(meta.shape) != tuple(want.shape):
                    problems.append(f"{hf} lora {label}: stored {None if meta is None else tuple(meta.shape)}, "
                                    f"expected {tuple(want.shape)}")
    if problems:
        raise AdapterError(f"{tensor_dir}: LoRA tensors do not match adapter_meta.json: " + "; ".join(problems[:8]))
