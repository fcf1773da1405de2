"""The device side of a bucketed stage-2 call: the frozen vision tower once per QA, then the gradient.

1. `vision(frames)`: the call's frames laid out by row (`stage2_frames.RowFrames`: each device's rows' frames, cut
   into chunks of FRAMES_PER_DEVICE per device) through the vision tower (`frame_vision.encode_frames`) ->
   [dp, N, hidden]: block j is device j's rows' merged frame tokens, on device j. The tower is frozen, so this
   output serves both the question-aware event scoring (`project_rows`, with the current adapter) and the gradient
   step (which projects it inside the differentiated function).
2. `inputs(call, flat)` -> [R, U, hidden]: each row's visual inputs, gathered on the row's own device.
3. `grad(state, frozen, arrays, inputs)` (`step.make_stage2_grad`).
Every host array enters through a callback that builds only the shards of this process's devices, so a process
never needs (or builds) another process's rows. Programs: vision keyed by (frames per chunk, patches bucket,
merge), gradient by (rows, L, U, A); the gathers and projections are small programs that take no tower weights.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from cogstream_jax import compiled_store, persistent_cache
from cogstream_jax.compile_log import CompileLog
from cogstream_jax.model.frame_vision import encode_frames
from cogstream_jax.training.stage2_buckets import Stage2Call
from cogstream_jax.training.stage2_frames import FRAMES_PER_DEVICE, RowFrames
from cogstream_jax.training.step import BATCH_AXES, data_parallel_size, make_stage2_grad


class Stage2Device:
    def __init__(self, setup):
        self.setup = setup
        self.mesh = setup.mesh
        self.dp = data_parallel_size(self.mesh)
        self.frame_chunk = FRAMES_PER_DEVICE * self.dp
        self.rows = NamedSharding(self.mesh, PartitionSpec(BATCH_AXES))
        view = setup.model()
        self.vision_graphdef, vision_state = nnx.split(view.vision_encoder)
        self.vision_hidden = view.config.vision.hidden_size
        self.attn = dict(impl=view.attn_impl, mesh=view.attn_mesh, interpret=view.attn_interpret,
                         scan=view.scan_layers)
        self.dtype = view.dtype
        self._vision_state = vision_state
        self._grad = make_stage2_grad(setup.split.graphdef, options=setup.options,
                                      state_sharding=setup.state_sharding, frozen_sharding=setup.frozen_sharding,
                                      mesh=self.mesh)
        self._compiled: dict[tuple, object] = {}  # argument shapes -> executable compiled ahead (`precompile`)
        self._encode = jax.jit(functools.partial(_encode_chunk, self.vision_graphdef, attn=self.attn, dtype=self.dtype),
                               static_argnums=(5,))
        # each block / row stays on its device whatever layout the tower's output got (a scanned tower's comes out
        # feature-sharded)
        self._by_device = jax.jit(_by_device, out_shardings=self.rows)
        self._gather = jax.jit(_gather, out_shardings=self.rows)
        self._project = jax.jit(_project, static_argnums=(0,), out_shardings=self.rows)

    @property
    def grad_name(self) -> str:
        """The gradient program's name in compile logs (`compile_log.CompiledProgram.name`)."""
        return self._grad.__name__

    def vision_state(self):
        return self._vision_state

    def own_rows(self, rows: int) -> np.ndarray:
        """[rows] bool: the rows of a call whose shards live on this process's devices (the QAs it prepares)."""
        own = np.zeros(rows, bool)
        for index in self.rows.addressable_devices_indices_map((rows,)).values():
            own[index[0]] = True
        return own

    def put(self, x: np.ndarray):
        """A host array split over the rows: each process fills its own shards from `x`, whose other rows are
        never read (and may be left empty); no cross-process equality check (`jax.device_put` of a host array onto
        devices of several processes all-gathers it to compare)."""
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, self.rows, lambda index: x[index])

    def vision(self, frames: RowFrames | None) -> jax.Array | None:
        """The call's frames -> the vision output by device block [dp, N, hidden] (None without frames)."""
        if frames is None:
            return None
        outs = []
        tails = [(frames.patches, frames.patch_dim)] + [(frames.patches,)] * 3  # pixels, rows, cols, valid
        for c in range(frames.chunks):
            parts = {}

            def block(index, i, c=c, parts=parts):
                j = (index[0].start or 0) // FRAMES_PER_DEVICE
                if j not in parts:
                    parts[j] = frames.chunk(j, c)
                return parts[j][i]

            arrays = [jax.make_array_from_callback((self.dp * FRAMES_PER_DEVICE,) + tails[i], self.rows,
                                                   functools.partial(block, i=i)) for i in range(4)]
            outs.append(self._encode(self._vision_state, *arrays, frames.merge))
        return self._by_device(outs)

    def inputs(self, call: Stage2Call, flat: jax.Array | None) -> jax.Array:
        """The call's per-row visual inputs [R, U, hidden] (zeros for a text-only call)."""
        r, u = call.sources.shape
        if flat is None:
            return self.put(np.zeros((r, u, self.vision_hidden), self.dtype))
        return self._gather(flat, self.put(call.sources))

    def project_rows(self, projector, flat: jax.Array, index: np.ndarray) -> jax.Array:
        """Each row's visual tokens `index` [R, V] through the projector (current adapter, no dropout): [R, V, D],
        event scoring's input, on the row's device."""
        graphdef, state = nnx.split(projector)
        return self._project(graphdef, state, flat, self.put(index))

    def local_rows(self, x: jax.Array) -> dict[int, jax.Array]:
        """Row r -> x[r] for the rows held by this process's devices, each on its device (no collective)."""
        out = {}
        for shard in x.addressable_shards:
            if shard.data.shape[1:] != x.shape[1:]:
                raise ValueError(f"local_rows: {x.shape} is split beyond its rows ({shard.data.shape} per shard)")
            start = shard.index[0].start or 0
            for i in range(shard.data.shape[0]):
                out.setdefault(start + i, shard.data[i])
        return out

    def grad(self, state, frozen, arrays: dict[str, jax.Array], inputs: jax.Array):
        """(grads, losses [R], counts [R]) of one call: the executable `precompile` made for these shapes, else the
        jitted step (which compiles on first use)."""
        run = self._compiled.get(_grad_key(arrays, inputs), self._grad)
        return run(state, frozen, arrays, inputs)

    def precompile(self, state, frozen, calls: Sequence[Stage2Call], threads: int | None = None,
                   saved: Mapping[str, tuple[str, object]] | None = None) -> tuple[int, int]:
        """Compile the gradient for each call's shapes before training, several at a time (XLA compiles outside
        Python's lock), so that no update waits for a compile and a program that cannot compile fails first.
        `saved` (`compiled_store.load`): executables compiled ahead, by the hash of their lowered program; a call
        whose program lowers to one of them takes it instead of compiling. (Compiled, taken from `saved`, read back
        from JAX's persistent compilation cache)."""
        lowered, taken = {}, 0
        for call in calls:
            arrays = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.rows) for k, v in call.arrays.items()}
            inputs = jax.ShapeDtypeStruct(call.sources.shape + (self.vision_hidden,), self.dtype, sharding=self.rows)
            key = _grad_key(arrays, inputs)
            if key in self._compiled or key in lowered:
                continue
            mark = CompileLog.mark()
            low = self._grad.lower(state, frozen, arrays, inputs)
            ahead = compiled_store.take(saved, low, since=mark)
            if ahead is not None:
                self._compiled[key], taken = ahead, taken + 1
            else:
                lowered[key] = low
        before = persistent_cache.reads()
        if lowered:
            threads = threads or min(4, os.cpu_count() or 1)
            with ThreadPoolExecutor(max_workers=max(1, min(threads, len(lowered)))) as pool:
                self._compiled.update(zip(lowered, pool.map(lambda low: low.compile(), lowered.values())))
        read_back = persistent_cache.reads() - before
        return len(lowered) - read_back, taken, read_back

    def lower_grad(self, state, frozen, arrays, inputs):
        return self._grad.lower(state, frozen, arrays, inputs)

    def lower_vision(self, pixels, rows, cols, valid, merge: int):
        return self._encode.lower(self._vision_state, pixels, rows, cols, valid, merge)


def _grad_key(arrays, inputs) -> tuple:
    return tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(arrays.items())) + (
        (tuple(inputs.shape), str(inputs.dtype)),)


def _encode_chunk(graphdef, state, pixels, rows, cols, valid, merge, *, attn, dtype):
    encoder = nnx.merge(graphdef, state)
    out = encode_frames(encoder, pixels, rows, cols, valid, merge, dtype=dtype, **attn)
    return jax.lax.stop_gradient(out)


def _by_device(outs):
    """Chunks [dp * FRAMES_PER_DEVICE, T, H] -> [dp, chunks * FRAMES_PER_DEVICE * T, H] (block j: device j's)."""
    dp = outs[0].shape[0] // FRAMES_PER_DEVICE
    return jnp.concatenate([o.reshape(dp, -1, o.shape[-1]) for o in outs], axis=1)


def _gather(flat, sources):
    """flat [dp, N, H], sources [R, U] (indices into the row's own block) -> [R, U, H], gathered per device."""
    blocks = sources.reshape(flat.shape[0], -1, sources.shape[-1])
    out = jax.vmap(lambda f, s: f[s], spmd_axis_name=BATCH_AXES)(flat, blocks)
    return out.reshape((-1,) + out.shape[2:])


def _project(graphdef, state, flat, index):
    return jax.lax.stop_gradient(nnx.merge(graphdef, state)(_gather(flat, index)))
