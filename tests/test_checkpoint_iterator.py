"""The data iterator's checkpoint is one file for every process count: a run saved by 2 processes resumes in 1
(end to end in test_train_stage2_multihost.py); grain's per-process files from older checkpoints still restore."""
from __future__ import annotations

import json

import grain
from etils import epath

from cogstream_jax.training.checkpoint import IteratorRestore, IteratorSave, SharedIteratorHandler


class _Stream:
    """An iterator with grain's checkpoint protocol and a byte state (as stage 2's QAStream)."""

    def __init__(self, consumed: int = 0):
        self.consumed, self.prefetching = consumed, False

    def get_state(self) -> bytes:
        return json.dumps({"consumed": self.consumed}).encode()

    def set_state(self, state: bytes) -> None:
        self.consumed = json.loads(state.decode())["consumed"]

    def start_prefetch(self) -> None:
        self.prefetching = True


def test_one_state_file_restores_in_any_process_count(tmp_path):
    handler = SharedIteratorHandler()
    handler.save(epath.Path(tmp_path), args=IteratorSave(_Stream(7)))
    assert sorted(p.name for p in tmp_path.iterdir()) == [SharedIteratorHandler.FILE]
    restored = handler.restore(epath.Path(tmp_path), args=IteratorRestore(_Stream()))
    assert restored.consumed == 7 and restored.prefetching


def test_grain_dataset_iterators_keep_their_json_state(tmp_path):
    iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
    next(iterator), next(iterator)
    handler = SharedIteratorHandler()
    handler.save(epath.Path(tmp_path), args=IteratorSave(iterator))
    fresh = iter(grain.MapDataset.range(10).to_iter_dataset())
    handler.restore(epath.Path(tmp_path), args=IteratorRestore(fresh))
    assert next(fresh) == 2


def test_per_process_files_of_older_checkpoints_restore(tmp_path):
    for i in range(2):  # what grain's own handler wrote for a 2-process run
        (tmp_path / f"process_{i}-of-2.json").write_text(json.dumps({"consumed": 5}))
    restored = SharedIteratorHandler().restore(epath.Path(tmp_path),
                                               args=IteratorRestore(_Stream()))
    assert restored.consumed == 5
