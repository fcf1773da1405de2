"""Resumable training checkpoints with orbax: LoRA params, optimiser state, step, RNG and the grain iterator.

Items of one step directory: `state` (every TrainState leaf, stored flat as `leaf_00000`... so odd pytree keys
never reach orbax), `meta` (JSON: leaf paths for validation, run fingerprint, metrics) and `data` (the data
iterator's state, one file: every process of both stages reads the whole global batch, so the state is the same
on all of them). Saves are asynchronous; `keep_last` old steps are kept. Restores go onto abstract targets that
carry the CURRENT mesh's shardings, so a checkpoint written on one mesh, device count or process count restores on
any other.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from cogstream_jax.errors import ConfigError, WeightError
from cogstream_jax.io_utils import as_path
from cogstream_jax.run_settings import describe_changes
from cogstream_jax.training.state import TrainState


CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointError(WeightError):
    """A training checkpoint is missing, unreadable or does not match this run."""


def checkpoint_dir(output_dir: str | os.PathLike) -> pathlib.Path:
    """`<output_dir>/checkpoints`: absolute locally, kept as a URL (epath) on an object store."""
    return as_path(output_dir) / CHECKPOINT_SUBDIR


def _saved_steps(directory: pathlib.Path) -> list[int]:
    """Finished step directories (orbax names them by the step; temp ones carry a suffix)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def check_resume(directory: pathlib.Path, resume: bool) -> None:
    """`--resume` needs a checkpoint; without it an earlier run's checkpoints must not be mixed in."""
    steps = _saved_steps(directory)
    if resume and not steps:
        raise ConfigError(f"--resume: no checkpoint found in {directory}")
    if not resume and steps:
        raise ConfigError(f"{directory}: holds checkpoints of an earlier run; pass --resume to continue it "
                          "or choose another --output_dir")


def latest_meta(output_dir: str | os.PathLike) -> dict | None:
    """The newest checkpoint's metadata (None without one), for settings a run must know before it restores."""
    directory = checkpoint_dir(output_dir)
    if not _saved_steps(directory):
        return None
    ckpt = TrainCheckpointer(directory, async_save=False)
    try:
        return ckpt.read_meta(ckpt.latest_step())
    finally:
        ckpt.close()


def check_same_run(saved: dict | None, current: dict | None, where: pathlib.Path) -> None:
    """Refuse to resume under settings that change the run (data order, schedule, adapter, precision)."""
    details = describe_changes(saved, current)  # None also for checkpoints written before fingerprints existed
    if details:
        raise CheckpointError(f"{where}: --resume with settings that differ from the checkpointed run ({details}); "
                              "resume with the original settings or start a new --output_dir")


def _leaf_paths(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _flat(tree: Any) -> dict[str, Any]:
    return {f"leaf_{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


class SharedIteratorHandler(grain.checkpoint.CheckpointHandler):
    """grain's iterator handler with one state file for all processes (grain writes one per process, named by the
    process count, so a run saved by 2 processes could not resume in 1). Process 0 writes it; any process count
    reads it; checkpoints written per process restore from their first file."""

    FILE = "iterator.json"

    def save(self, directory, item=None, args=None):
        item = item or args.item
        if jax.process_index() == 0:
            state = item.get_state()  # a dict for grain dataset iterators, bytes for the others (as grain stores them)
            (directory / self.FILE).write_text(json.dumps(state, indent=4) if isinstance(item, grain.DatasetIterator)
                                               else state.decode())

    def restore(self, directory, item=None, args=None):
        item = item or args.item
        path = directory / self.FILE
        if not path.exists():
            legacy = sorted(directory.glob("process_*-of-*.json"))
            if not legacy:
                raise ValueError(f"{path} does not exist")
            path = legacy[0]
        text = path.read_text()
        item.set_state(json.loads(text) if isinstance(item, grain.DatasetIterator) else text.encode())
        item.start_prefetch()
        return item


@ocp.args.register_with_handler(SharedIteratorHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(SharedIteratorHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
    item: Any


class TrainCheckpointer:
    """`CheckpointManager` over `directory` (created on first save)."""

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 3, async_save: bool = True):
        self.directory = as_path(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep_last, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                           "data": SharedIteratorHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, *, data_iterator: Any = None, meta: dict | None = None) -> int:
        """Start saving at the state's step (returns it); data iterator state is captured now."""
        step = int(jax.device_get(state.step))
        items = {"state": ocp.args.StandardSave(_flat(state)),
                 "meta": ocp.args.JsonSave({"leaf_paths": _leaf_paths(state), **(meta or {})})}
        if data_iterator is not None:
            items["data"] = IteratorSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        return step

    def read_meta(self, step: int) -> dict:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises assorted types for damaged directories
            where = self.directory / str(step)
            raise CheckpointError(f"{where}: unreadable checkpoint metadata ({_short(e)})") from None

    def restore(self, template: TrainState, shardings: TrainState, *, step: int | None = None,
                data_iterator: Any = None) -> TrainState:
        """Restore `step` (default latest) onto the current mesh; `template` gives structure, shapes and dtypes."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"--resume: no checkpoint found in {self.directory}")
        meta = self.read_meta(step)
        expected = _leaf_paths(template)
        if meta.get("leaf_paths") != expected:
            raise CheckpointError(f"{self.directory / str(step)}: field 'meta.leaf_paths' does not match this run's "
                                  "train state (another adapter, model or optimiser?)")
        leaves, treedef = jax.tree.flatten(template)
        sh_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        if len(sh_leaves) != len(leaves):  # shardings given as a prefix tree: broadcast it
            sh_leaves = jax.tree.leaves(jax.tree.map(lambda s, _: s, shardings, template,
                                                     is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)))
        abstract = {f"leaf_{i:05d}": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                    for i, (x, s) in enumerate(zip(leaves, sh_leaves))}
        items = {"state": ocp.args.StandardRestore(abstract)}
        if data_iterator is not None:
            items["data"] = IteratorRestore(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            where = self.directory / str(step)
            raise CheckpointError(f"{where}: cannot restore the train state ({_short(e)})") from None
        flat = restored["state"]
        return jax.tree.unflatten(treedef, [flat[f"leaf_{i:05d}"] for i in range(len(leaves))])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"
