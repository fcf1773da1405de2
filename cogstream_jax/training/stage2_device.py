"""The device side of a bucketed stage-2 call: the frozen vision tower once per QA, then the gradient.

1. `vision(frames)`: the frames of every QA of the call, cut into chunks of `frame_chunk` frames (split over
   data x fsdp), through the vision tower (`frame_vision.encode_frames`), concatenated: [F * P / m^2, hidden].
   The tower is frozen, so this output serves both the question-aware event scoring (which projects it with the
   current adapter) and the gradient step (which projects it inside the differentiated function).
2. `gather(features, sources)` -> [R, U, hidden]: each row's visual inputs.
3. `grad(state, frozen, arrays, inputs)` (`step.make_stage2_grad`).
Programs: vision keyed by (frames per chunk, patches bucket, merge), gradient by (rows, L, U, A); the gathers
and projections are small programs that take no tower weights.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from cogstream_jax.model.frame_vision import encode_frames
from cogstream_jax.training.stage2_buckets import FRAMES_PER_DEVICE, Frames, Stage2Call
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
        self.grad = make_stage2_grad(setup.split.graphdef, options=setup.options, state_sharding=setup.state_sharding,
                                     frozen_sharding=setup.frozen_sharding, mesh=self.mesh)
        self._encode = jax.jit(functools.partial(_encode_chunk, self.vision_graphdef, attn=self.attn, dtype=self.dtype),
                               static_argnums=(5,))
        # rows over data x fsdp whatever layout the vision output got (a scanned tower's comes out feature-sharded)
        self._gather = jax.jit(_gather, out_shardings=self.rows)

    def vision_state(self):
        return self._vision_state

    def put(self, x: np.ndarray):
        """A host array (the same on every process) split over the rows: each process fills its own shards, with
        no cross-process equality check (`jax.device_put` of a host array onto devices of several processes
        all-gathers it to compare)."""
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, self.rows, lambda index: x[index])

    def vision(self, frames: Frames) -> jax.Array | None:
        """The call's frames -> the flattened vision output [F * P / m^2, hidden] (None without frames)."""
        if frames.arrays is None:
            return None
        pixels, rows, cols, valid = frames.arrays
        outs = []
        for start in range(0, pixels.shape[0], self.frame_chunk):
            sl = slice(start, start + self.frame_chunk)
            outs.append(self._encode(self._vision_state, self.put(pixels[sl]), self.put(rows[sl]),
                                     self.put(cols[sl]), self.put(valid[sl]), frames.merge))
        return _flatten(outs)

    def inputs(self, call: Stage2Call, flat: jax.Array | None) -> jax.Array:
        """The call's per-row visual inputs [R, U, hidden] (zeros for a text-only call)."""
        r, u = call.sources.shape
        if flat is None:
            return self.put(np.zeros((r, u, self.vision_hidden), self.dtype))
        return self._gather(flat, self.put(call.sources))

    def lower_grad(self, state, frozen, arrays, inputs):
        return self.grad.lower(state, frozen, arrays, inputs)

    def lower_vision(self, pixels, rows, cols, valid, merge: int):
        return self._encode.lower(self._vision_state, pixels, rows, cols, valid, merge)


def _encode_chunk(graphdef, state, pixels, rows, cols, valid, merge, *, attn, dtype):
    encoder = nnx.merge(graphdef, state)
    out = encode_frames(encoder, pixels, rows, cols, valid, merge, dtype=dtype, **attn)
    return jax.lax.stop_gradient(out)


@jax.jit
def _flatten(outs):
    return jnp.concatenate([o.reshape(-1, o.shape[-1]) for o in outs], axis=0)


def _gather(flat, sources):
    return flat[sources]


@functools.partial(jax.jit, static_argnums=(0,))
def project(graphdef, state, flat, index):
    """The projector (current adapter, no dropout) on the flat vision output rows `index`: event scoring's input."""
    return jax.lax.stop_gradient(nnx.merge(graphdef, state)(flat[index]))
