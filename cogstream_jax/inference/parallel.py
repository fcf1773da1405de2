"""Evaluation over every local device of one process: one stream per device group, videos from a shared queue.

A process's local devices are split into groups of `devices_per_stream`; each group holds its own copy of the
model (on one device, or sharded over the group's devices with the training code's fsdp rules when one device
cannot hold it) and runs one stream at a time in its own thread. Workers take the next unfinished video from a
shared queue, so every video is evaluated once however long each takes; results are written whole (atomic
rename) as each video finishes, so a killed run resumes where it stopped. Answers do not depend on the worker:
each question's random key comes from (seed, video, question index), and every copy runs the same programs.

On CPU, fake devices (`--xla_force_host_platform_device_count`) share the host's cores, so `streams="auto"`
runs one stream there; GPUs and TPUs get one per group.
"""
from __future__ import annotations

import copy
import queue
import threading
from typing import Callable, Sequence

import jax

from cogstream_jax.errors import UserError

#: a group's copy of the weights may use this fraction of a device's memory (the rest: KV caches, activations)
WEIGHT_MEMORY_FRACTION = 0.6


def device_memory(device: jax.Device) -> int | None:
    """Bytes the device can allocate (None where the backend does not say, e.g. CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # backends without memory statistics
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def devices_per_stream(requested: str | int, n_devices: int, weight_bytes: int, memory: int | None) -> int:
    """`auto`: the fewest devices (a divisor of the local count) whose memory holds the weights with room to spare."""
    if requested != "auto":
        k = int(requested)
        if k < 1 or n_devices % k:
            raise UserError(f"--devices_per_stream {k}: must divide this process's {n_devices} local device(s)")
        return k
    if memory is None:
        return 1
    for k in range(1, n_devices + 1):
        if n_devices % k == 0 and weight_bytes / k <= WEIGHT_MEMORY_FRACTION * memory:
            return k
    raise UserError(f"the model's {weight_bytes / 2**30:.1f} GiB of weights do not fit {n_devices} local device(s) "
                    f"of {memory / 2**30:.1f} GiB each; use a smaller --dtype or more devices")


def stream_count(requested: str | int, groups: int, platform: str) -> int:
    if requested == "auto":
        return 1 if platform == "cpu" else groups
    n = int(requested)
    if not 1 <= n <= groups:
        raise UserError(f"--streams {n}: must be between 1 and the {groups} device group(s) of this process")
    return n


def device_groups(devices: Sequence[jax.Device], per_stream: int, streams: int) -> list[tuple[jax.Device, ...]]:
    groups = [tuple(devices[i:i + per_stream]) for i in range(0, len(devices), per_stream)]
    return groups[:streams]


def group_mesh(group: Sequence[jax.Device]):
    """The fsdp mesh over one group's devices (the training code's sharding rules place the weights on it)."""
    from cogstream_jax.sharding import make_mesh

    return make_mesh("1,-1,1", list(group))


def place_on(model, group: Sequence[jax.Device]) -> None:
    """Move `model` (weights and loaded adapters) onto `group` in place: committed to its one device, or
    fsdp-sharded over its devices (fused attention then runs under shard_map over them)."""
    from cogstream_jax.model.videollama3 import use_attention
    from cogstream_jax.sharding import shard_model

    mesh = group_mesh(group)
    shard_model(model, mesh)
    if len(group) > 1:
        use_attention(model, model.attn_impl, mesh=mesh)


def place_model(model, group: Sequence[jax.Device]):
    """A copy of `model` on `group` (see `place_on`); `model` stays where it is."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    placed = nnx.merge(graphdef, state)  # new module objects; place_on replaces every array
    place_on(placed, group)
    return placed


def replicate_session(session, group: Sequence[jax.Device]):
    """A StreamingSession like `session` whose model lives on `group` (its own processor copy: no shared state)."""
    from cogstream_jax.inference.session import StreamingSession

    return StreamingSession(place_model(session.model, group), copy.copy(session.processor),
                            retrieval_adapter=session.retrieval_adapter, answer_adapter=session.answer_adapter,
                            sampling=session.sampling, options=session.options)


def run_workers(sessions: Sequence, jobs: Sequence, groups: Sequence[Sequence[jax.Device]] | None,
                work: Callable[[object, object], None]) -> None:
    """`work(session, job)` for every job, each session in its own thread taking jobs from one queue (the calling
    thread when there is one session). `groups[i]`: session i's devices (None: the default device). The first
    failure stops the others after their current video and is raised."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for job in jobs:
        todo.put(job)
    failures: list[BaseException] = []

    def worker(session, group):
        with jax.default_device(group[0] if group else None):
            while not failures:
                try:
                    job = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    work(session, job)
                except BaseException as exc:  # re-raised in the calling thread
                    failures.append(exc)
                    return

    groups = groups or [None] * len(sessions)
    if len(sessions) == 1:
        worker(sessions[0], groups[0])
    else:
        threads = [threading.Thread(target=worker, args=(s, g), daemon=True) for s, g in zip(sessions, groups)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if failures:
        raise failures[0]
