"""Host-side batch assembly: stage-1 pipeline elements -> the accumulating step's [micro, rows, ...] arrays.

Rows of the (1, 2 or 4) augmented samples of every item keep their item's slot of 4 rows; absent rows are all
padding with zero weight, so every micro-batch has a static shape. Supervised positions are computed here
(`losses.supervised_positions`) so the lm_head runs only where a target token is predicted.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from cogstream_jax.errors import ConfigError
from cogstream_jax.training.losses import supervised_positions

STEP_KEYS = ("input_ids", "attention_mask", "logits_positions", "targets", "weights")


def step_batch(input_ids: np.ndarray, labels: np.ndarray, attention_mask: np.ndarray, micro_batches: int,
               num_positions: int | None = None) -> dict[str, np.ndarray]:
    """Rows [R, L] (any leading shape, flattened) -> {key: [micro_batches, R / micro_batches, ...]}."""
    length = input_ids.shape[-1]
    ids = np.asarray(input_ids, np.int32).reshape(-1, length)
    rows = ids.shape[0]
    if rows % micro_batches:
        raise ConfigError(f"--gradient_accumulation_steps: {rows} rows do not split into {micro_batches} micro-batches")
    positions, targets, weights = supervised_positions(np.asarray(labels).reshape(-1, length), num_positions)
    arrays = {"input_ids": ids, "attention_mask": np.asarray(attention_mask, np.int32).reshape(-1, length),
              "logits_positions": positions, "targets": targets, "weights": weights}
    return {k: v.reshape(micro_batches, rows // micro_batches, *v.shape[1:]) for k, v in arrays.items()}


def pad_length(element: Mapping[str, np.ndarray], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad a stage-1 element's [..., L] arrays to `length` (hosts agree on one length per update)."""
    fill = {"input_ids": pad_id, "labels": -100, "attention_mask": 0}
    out = dict(element)
    for key, value in fill.items():
        arr = element[key]
        extra = length - arr.shape[-1]
        if extra < 0:
            raise ConfigError(f"pad_length: element is longer ({arr.shape[-1]}) than {length}")
        out[key] = np.pad(arr, [(0, 0)] * (arr.ndim - 1) + [(0, extra)], constant_values=value)
    return out


def stage1_step_batch(element: Mapping[str, np.ndarray], micro_batches: int,
                      num_positions: int | None = None) -> dict[str, np.ndarray]:
    """A batched stage-1 element (items x 4 rows) -> the accumulating step's micro-batched arrays."""
    return step_batch(element["input_ids"], element["labels"], element["attention_mask"], micro_batches,
                      num_positions)
