"""Host-side collectives of a multi-process run, each a plain no-op (or a plain read) in a single process.

Low-level on purpose: the adapter writer, event compression and the training loop all use them.
"""
from __future__ import annotations

import jax
import numpy as np


def to_host(x) -> np.ndarray:
    """A (global) array as numpy on every process: shards owned by other processes are gathered first (reading
    a multi-process sharded array directly fails). Single-process and replicated arrays are read as they are."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def broadcast_from_primary(value: np.generic) -> np.generic:
    """Process 0's value of a numpy scalar, on every process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(value)


def global_max(value: int) -> int:
    """The maximum of an int over all processes (e.g. hosts agreeing on one padded length per batch)."""
    return int(agree_max(np.asarray([value], np.int64))[0])


def agree_max(values: np.ndarray) -> np.ndarray:
    """The elementwise maximum of an int64 array over all processes: one small all-gather. With each process
    filling only the rows it owns (zeros elsewhere), every process gets the whole table."""
    values = np.asarray(values, np.int64)
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values)).max(axis=0)
