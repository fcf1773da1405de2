"""Streaming safetensors reading and writing, one tensor at a time, bf16-safe.

We parse the format ourselves (an 8-byte little-endian header length, a JSON header of
`{name: {dtype, shape, data_offsets}}`, then the raw bytes) instead of going through `safe_open`:
- `safe_open(framework="numpy")` cannot return bf16, and `framework="flax"` puts every tensor on a device;
- reading with `readinto` into a fresh numpy buffer keeps exactly one tensor in (anonymous) host memory, with no
  memory-mapped pages that would count towards RSS;
- truncated files and inconsistent headers are detected before any byte is read, with the file and tensor named.
Writing is the inverse: the header is computed from shapes alone, then the tensors are produced and written one
by one into a temp file that replaces the target atomically (on an object store: one streamed upload, which
readers see whole or not at all). Paths may be URLs (`gs://...`, see cogstream_jax.remote).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from typing import Callable, Iterable, Iterator, Sequence

import ml_dtypes
import numpy as np

from cogstream_jax import remote
from cogstream_jax.io_utils import as_path, atomic_write_json, is_url
from cogstream_jax.errors import WeightError

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_TEMP_RE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors\.tmp\d+$")  # `write_file` temp names
_MAX_HEADER = 100 * 1024 * 1024

#: safetensors dtype tag <-> numpy dtype
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_TAGS = {v: k for k, v in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    name: str
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parse and validate one file's header (no tensor data is read)."""
    try:
        size = remote.getsize(path)
        with remote.open_file(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise WeightError(f"{path}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(_MAX_HEADER, size - 8):
                raise WeightError(f"{path}: not a safetensors file or truncated (header length {header_len}, "
                                  f"file size {size})")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise WeightError(f"{path}: safetensors file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise WeightError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + header_len
    infos = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[meta["dtype"]]
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise WeightError(f"{path}: tensor {name!r}: malformed header entry {meta!r}") from None
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise WeightError(f"{path}: tensor {name!r}: byte range {begin}..{end} does not fit shape {shape} "
                              f"{meta['dtype']}")
        if base + end > size:
            raise WeightError(f"{path}: truncated: tensor {name!r} needs bytes up to {base + end} but the file has "
                              f"{size}")
        infos[name] = TensorInfo(name, path, dtype, shape, base + begin, base + end)
    return infos


def read_tensor(info: TensorInfo, handle=None) -> np.ndarray:
    """One tensor as a fresh numpy array (bf16 as `ml_dtypes.bfloat16`)."""
    out = np.empty(info.shape, info.dtype)
    own = handle is None
    f = remote.open_file(info.file, "rb") if own else handle
    try:
        f.seek(info.start)
        got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
    finally:
        if own:
            f.close()
    if got != info.nbytes:
        raise WeightError(f"{info.file}: truncated while reading tensor {info.name!r} ({got} of {info.nbytes} bytes)")
    return out


class Checkpoint:
    """A safetensors checkpoint: one file, a folder with `model.safetensors`, or an index-sharded folder.

    Construction validates everything that can be checked without reading tensor data: the index, the presence
    of every shard it names, every header, and that each indexed tensor is in the shard the index says.
    """

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        self.path = path
        self.files = _checkpoint_files(path)
        self.tensors: dict[str, TensorInfo] = {}
        index = _read_index(path) if remote.isdir(path) else None
        for file in self.files:
            for name, info in read_header(file).items():
                if name in self.tensors:
                    raise WeightError(f"{file}: tensor {name!r} also appears in {self.tensors[name].file}")
                if index is not None and name not in index:
                    raise WeightError(f"{file}: tensor {name!r} is not listed in {os.path.join(path, INDEX_NAME)}")
                self.tensors[name] = info
        if index is not None:
            for name, shard in index.items():
                info = self.tensors.get(name)
                if info is None or os.path.basename(info.file) != shard:
                    raise WeightError(f"{os.path.join(path, shard)}: tensor {name!r} listed in {INDEX_NAME} is "
                                      "not in this shard")

    def keys(self) -> list[str]:
        return list(self.tensors)

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) pairs file by file in on-disk order; each array is the only one held by this reader."""
        for file in self.files:
            infos = sorted((i for i in self.tensors.values() if i.file == file), key=lambda i: i.start)
            with remote.open_file(file, "rb") as f:
                for info in infos:
                    yield info.name, read_tensor(info, f)


def _read_index(folder: str) -> dict[str, str] | None:
    index_path = os.path.join(folder, INDEX_NAME)
    if not remote.exists(index_path):
        return None
    try:
        with remote.open_file(index_path, "r") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightError(f"{index_path}: malformed index (need a 'weight_map' object): {e}") from None
    if not isinstance(weight_map, dict):
        raise WeightError(f"{index_path}: field 'weight_map' must be an object")
    return {str(k): str(v) for k, v in weight_map.items()}


def _checkpoint_files(path: str) -> list[str]:
    if remote.isfile(path):
        return [path]
    if not remote.isdir(path):
        raise WeightError(f"{path}: no such checkpoint file or folder")
    index = _read_index(path)
    if index is not None:
        files = []
        for shard in dict.fromkeys(index.values()):
            file = os.path.join(path, shard)
            if not remote.isfile(file):
                raise WeightError(f"{file}: shard named in {os.path.join(path, INDEX_NAME)} is missing")
            files.append(file)
        return files
    single = os.path.join(path, SINGLE_NAME)
    if remote.isfile(single):
        return [single]
    raise WeightError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME} found")


# ---------------------------------------------------------------------------------------------- writing
@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """What will be written for one tensor; the bytes come later from a producer."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


Producer = Callable[[TensorSpec], np.ndarray]


def _header_bytes(specs: Sequence[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for spec in specs:
        tag = _TAGS.get(np.dtype(spec.dtype))
        if tag is None:
            raise WeightError(f"tensor {spec.name!r}: dtype {spec.dtype} cannot be stored in safetensors")
        header[spec.name] = {"dtype": tag, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


def write_file(path: str, specs: Sequence[TensorSpec], produce: Producer,
               metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file atomically, asking `produce` for each tensor in turn."""
    if is_url(path):  # one upload, committed when the stream closes without an error
        with as_path(path).open("wb") as f:
            _write_tensors(f, specs, produce, metadata)
        return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            _write_tensors(f, specs, produce, metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_tensors(f, specs: Sequence[TensorSpec], produce: Producer, metadata: dict[str, str] | None) -> None:
    f.write(_header_bytes(specs, metadata))
    for spec in specs:
        array = np.ascontiguousarray(produce(spec))
        if array.shape != tuple(spec.shape) or array.dtype != np.dtype(spec.dtype):
            raise ValueError(f"tensor {spec.name!r}: produced {array.shape} {array.dtype}, "
                             f"declared {spec.shape} {spec.dtype}")
        f.write(memoryview(array.reshape(-1).view(np.uint8)))
        del array


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy split in order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards




def _shard_names(count: int) -> list[str]:
    """transformers' file names for a checkpoint of `count` shards."""
    return [SINGLE_NAME] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_checkpoint(folder: str | os.PathLike, specs: Iterable[TensorSpec], produce: Producer,
                     max_shard_bytes: int = 5 * 1024**3, metadata: dict[str, str] | None = None,
                     keep: Callable[[str, list[TensorSpec]], bool] | None = None) -> list[str]:
    """Write `model.safetensors` or `model-0000i-of-0000n.safetensors` + index, like transformers does.

    `keep(path, shard)` may say that a shard file already on disk is complete (a resumed job), so it is not
    produced again. Shard files of an earlier save that the new one does not use, and temp files of an
    interrupted one, are removed afterwards, so the folder never mixes two checkpoints. The index and
    `config.json` of an earlier save go first (callers write config.json last): a save interrupted half-way
    leaves a folder that does not load, rather than one that loads old and new shards together.
    Returns the file names.
    """
    folder = os.fspath(folder)
    as_path(folder).mkdir(parents=True, exist_ok=True)
    for marker in (INDEX_NAME, CONFIG_NAME):
        (as_path(folder) / marker).unlink(missing_ok=True)
    specs = list(specs)
    shards = plan_shards(specs, max_shard_bytes)
    names = _shard_names(len(shards))
    for name, shard in zip(names, shards):
        path = os.path.join(folder, name)
        if keep is None or not keep(path, shard):
            write_file(path, shard, produce, metadata)
    index_path = os.path.join(folder, INDEX_NAME)
    if len(shards) > 1:
        weight_map = {spec.name: name for name, shard in zip(names, shards) for spec in shard}
        atomic_write_json(index_path, {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                                       "weight_map": weight_map})
    for stale in remote.listdir(folder):
        stale_shard = _SHARD_RE.match(stale) or stale == SINGLE_NAME
        leftover = _TEMP_RE.match(stale) is not None
        if (stale_shard and stale not in names) or leftover:  # (an earlier index went first)
            (as_path(folder) / stale).unlink()
    return names
