"""Multi-host setup: guarded `jax.distributed.initialize`, CPU collectives, and per-process data -> global arrays.

One code path for 1 device, N devices and N hosts: each process feeds its own shard of every global batch
(grain `ShardOptions(process_index, process_count)`), and `jax.make_array_from_process_local_data` stitches the
shards into arrays laid out over the whole mesh.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax
import numpy as np

from cogstream_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0

    @classmethod
    def from_env(cls, coordinator: str | None = None, num_processes: int | None = None,
                 process_id: int | None = None) -> "DistributedConfig":
        """Flags first, then COGSTREAM_COORDINATOR / COGSTREAM_NUM_PROCESSES / COGSTREAM_PROCESS_ID."""
        env = os.environ
        try:
            return cls(coordinator or env.get("COGSTREAM_COORDINATOR") or None,
                       int(num_processes if num_processes is not None else env.get("COGSTREAM_NUM_PROCESSES", 1)),
                       int(process_id if process_id is not None else env.get("COGSTREAM_PROCESS_ID", 0)))
        except ValueError:
            raise ConfigError("COGSTREAM_NUM_PROCESSES / COGSTREAM_PROCESS_ID must be integers") from None


_initialized = False


def maybe_initialize(config: DistributedConfig) -> None:
    """Initialise the JAX distributed runtime when more than one process is requested (once per process).

    On CPU the cross-process collectives use gloo. Single-process runs skip initialisation entirely.
    """
    global _initialized
    if config.num_processes <= 1 or _initialized:
        return
    if not config.coordinator_address:
        raise ConfigError("--coordinator_address is required when --num_processes > 1 (e.g. 10.0.0.1:1234)")
    if not 0 <= config.process_id < config.num_processes:
        raise ConfigError(f"--process_id {config.process_id} not in [0, {config.num_processes})")
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or jax.config.jax_platforms == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=config.coordinator_address, num_processes=config.num_processes,
                               process_id=config.process_id)
    _initialized = True


def is_primary() -> bool:
    return jax.process_index() == 0


def global_from_host(arrays: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Global arrays from host arrays that every process holds in full: each process fills only its own devices'
    pieces, whatever the sharding (rows split over data x fsdp, or replicated across processes on a tensor-only
    mesh), so the global batch is the same for any process count and device order."""
    out: dict[str, jax.Array] = {}
    for key, value in arrays.items():
        value = np.asarray(value)
        out[key] = jax.make_array_from_callback(value.shape, sharding, lambda index, v=value: v[index])
    return out

