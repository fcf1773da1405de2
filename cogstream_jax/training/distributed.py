"""Multi-host setup: one JAX runtime over every process of a job, CPU collectives, and per-process data -> global
arrays.

Start-up (`maybe_initialize`, called by both training stages and `cogstream eval` before anything touches a
device): flags win (`--coordinator_address/--num_processes/--process_id`), then `COGSTREAM_COORDINATOR /
COGSTREAM_NUM_PROCESSES / COGSTREAM_PROCESS_ID`, then the variables the README documents for GPU clusters
(`JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID`). With none of them, a cluster JAX itself detects
(Cloud TPU pod slices, SLURM, Open MPI, Kubernetes with the `kubernetes` package) and that has more than one
process is joined with `jax.distributed.initialize()`; a plain single host is left alone. An unreachable
coordinator is a one-line error after `COGSTREAM_INIT_TIMEOUT` seconds (default 300), not a hang or an abort.

One code path for 1 device, N devices and N hosts: each process feeds its own shard of every global batch
(grain `ShardOptions(process_index, process_count)`), and `jax.make_array_from_process_local_data` stitches the
shards into arrays laid out over the whole mesh.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from typing import Mapping

import jax
import numpy as np

from cogstream_jax.errors import ConfigError

#: (ours, the README's JAX_* names) per setting, in order of precedence after the flags
ENV_NAMES = {"coordinator": ("COGSTREAM_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
             "num_processes": ("COGSTREAM_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
             "process_id": ("COGSTREAM_PROCESS_ID", "JAX_PROCESS_ID")}
TIMEOUT_ENV = "COGSTREAM_INIT_TIMEOUT"
DEFAULT_TIMEOUT_S = 300


def _env(key: str) -> tuple[str | None, str | None]:
    """(value, variable name) of the first of a setting's variables that is set (and not empty)."""
    for name in ENV_NAMES[key]:
        value = os.environ.get(name, "").strip()
        if value:
            return value, name
    return None, None


def _as_int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0
    #: where the settings came from: "flags/environment" (explicit), "cluster" (JAX detects one) or "single"
    source: str = "single"

    @classmethod
    def from_env(cls, coordinator: str | None = None, num_processes: int | None = None,
                 process_id: int | None = None) -> "DistributedConfig":
        """Flags first, then COGSTREAM_*, then JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; with
        none of them, a multi-process cluster JAX detects (source "cluster"), else a single process."""
        values, names = {}, {}
        for key, flag in (("coordinator", coordinator), ("num_processes", num_processes), ("process_id", process_id)):
            if flag is not None:
                values[key], names[key] = flag, f"--{'coordinator_address' if key == 'coordinator' else key}"
            else:
                values[key], names[key] = _env(key)
        explicit = any(v is not None for v in values.values())
        if not explicit:
            detected = detect_cluster()
            return cls(source="cluster") if detected else cls()
        count = 1 if values["num_processes"] is None else _as_int(values["num_processes"], names["num_processes"])
        index = 0 if values["process_id"] is None else _as_int(values["process_id"], names["process_id"])
        if values["num_processes"] is None and values["coordinator"] is not None and detect_cluster():
            return cls(values["coordinator"], source="cluster")  # the cluster supplies count and index
        return cls(values["coordinator"] or None, count, index, source="flags/environment")


def detect_cluster() -> str | None:
    """The name of a multi-process cluster environment JAX's own auto-detection recognises (not the opt-in
    mpi4py one), or None: SLURM / Open MPI / Cloud TPU pod slices / Kubernetes (with the `kubernetes` package).
    Environments of a single process (one SLURM task, a one-host TPU VM) count as none."""
    try:
        from jax._src import clusters
    except ImportError:  # private module moved: only explicit settings then
        return None
    for cluster in clusters.ClusterEnv._cluster_types:
        if getattr(cluster, "opt_in_only_method", False):
            continue
        try:
            if cluster.is_env_present() and int(cluster.get_process_count()) > 1:
                return cluster.__name__
        except Exception:  # a half-present environment (e.g. metadata server errors) is not a cluster
            continue
    return None


def init_timeout_s() -> int:
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    timeout = DEFAULT_TIMEOUT_S if not value else _as_int(value, TIMEOUT_ENV)
    if timeout < 1:
        raise ConfigError(f"{TIMEOUT_ENV} must be >= 1 second, got {timeout}")
    return timeout


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"coordinator address {address!r} is not host:port (e.g. 10.0.0.1:1234)")
    return host.strip("[]"), int(port)


def _wait_for_coordinator(address: str, timeout_s: int) -> None:
    """Processes other than 0 connect to process 0's coordinator service: wait until its port accepts
    connections, or fail with a clear error after `timeout_s` (JAX itself aborts the process with a C++ stack
    trace when its own deadline passes)."""
    host, port = _split_address(address)
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(0.1, deadline - time.monotonic()))):
                return
        except OSError as exc:
            last = exc
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    raise ConfigError(f"cannot reach the JAX coordinator at {address} within {timeout_s} s ({last}); is process 0 "
                      f"running and the address/port right? ({TIMEOUT_ENV} sets the wait)")


def _check_coordinator_port(address: str) -> None:
    """Process 0 serves the coordinator on the address's port: a port already taken is a clear error."""
    _, port = _split_address(address)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as exc:
            raise ConfigError(f"process 0 cannot serve the JAX coordinator on port {port} ({exc}); pick a free "
                              "port") from None


_initialized = False


def maybe_initialize(config: DistributedConfig, log=None) -> None:
    """Form one JAX runtime over the job's processes (once per process): explicit settings with more than one
    process, or a detected cluster; then log the process count and local/global devices. Single-process runs
    skip initialisation entirely (the log line is still printed).

    On CPU the cross-process collectives use gloo."""
    global _initialized
    if _initialized:
        return
    if config.source == "cluster" or config.num_processes > 1:
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or jax.config.jax_platforms == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        timeout = init_timeout_s()
        if config.source == "cluster":
            jax.distributed.initialize(coordinator_address=config.coordinator_address,
                                       initialization_timeout=timeout)
        else:
            if not config.coordinator_address:
                raise ConfigError("a coordinator address is required with more than one process: "
                                  "--coordinator_address or JAX_COORDINATOR_ADDRESS (e.g. 10.0.0.1:1234)")
            if not 0 <= config.process_id < config.num_processes:
                raise ConfigError(f"process id {config.process_id} not in [0, {config.num_processes})")
            if config.process_id == 0:
                _check_coordinator_port(config.coordinator_address)
            else:
                _wait_for_coordinator(config.coordinator_address, timeout)
            jax.distributed.initialize(coordinator_address=config.coordinator_address,
                                       num_processes=config.num_processes, process_id=config.process_id,
                                       initialization_timeout=timeout)
        _initialized = True
    (log or _log)(runtime_summary())


def runtime_summary() -> str:
    return (f"jax runtime: process {jax.process_index()} of {jax.process_count()}, "
            f"{jax.local_device_count()} local / {jax.device_count()} global {jax.default_backend()} devices")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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

