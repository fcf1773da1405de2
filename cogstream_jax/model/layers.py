"""Basic layers with PyTorch-matching numerics and logical sharding axes.

Every parameter carries an `axes` metadata tuple of logical axis names (see `cogstream_jax.sharding`), so one
rules table maps the whole model onto a mesh. `Linear` holds named LoRA adapters beside its frozen kernel
(PEFT semantics: A [in, r], B [r, out], scale alpha/r, dropout on A's input); the active adapter is a static
attribute, so switching adapters retraces instead of touching base weights.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import zlib
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]
#: ((logical axis, size), ...): that axis may only be split in whole multiples of `size` (one head's width); a
#: tuple, since it is static module metadata (graph definitions must be hashable)
Units = tuple[tuple[str, int], ...]

_DROPOUT_KEY: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("lora_dropout_key", default=None)
_DROPOUT_MASKS: contextvars.ContextVar[str] = contextvars.ContextVar("lora_dropout_masks", default="bernoulli")
MASK_METHODS = ("bernoulli", "hash")
#: static salt -> the salt to fold in instead (traced): scanned layers run layer 0's modules with each layer's salts
_SALTS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("lora_layer_salts", default=None)


@contextlib.contextmanager
def layer_salts(salts: dict) -> Iterator[None]:
    """Dropout salts of the layer being traced ({static salt: salt}), for `scan_layers`."""
    token = _SALTS.set(salts)
    try:
        yield
    finally:
        _SALTS.reset(token)


@contextlib.contextmanager
def lora_dropout(key: jax.Array | None, masks: str = "bernoulli") -> Iterator[None]:
    """Enable LoRA dropout for the model calls traced inside this block (None = deterministic).

    Each adapted Linear derives its own mask key from `key` and a hash of its module path, so no RNG has to be
    threaded through every module call. `masks`: "bernoulli" draws them with `jax.random.bernoulli` (the key's
    own bit generator); "hash" (`hashed_keep_mask`) is about 100x faster on XLA:CPU and equally mesh-independent.
    """
    if masks not in MASK_METHODS:
        raise ValueError(f"lora_dropout masks: expected one of {MASK_METHODS}, got {masks!r}")
    token, method = _DROPOUT_KEY.set(key), _DROPOUT_MASKS.set(masks)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)
        _DROPOUT_MASKS.reset(method)


def active_dropout_key() -> jax.Array | None:
    """The key set by `lora_dropout` (None outside it); cached-jit entry points should refuse to run under one."""
    return _DROPOUT_KEY.get()


def hashed_keep_mask(key: jax.Array, shape: tuple[int, ...], keep: float) -> jax.Array:
    """Boolean keep mask with P(True) = `keep` from a counter-based hash: the element's global flat index (iota,
    which the SPMD partitioner offsets per shard, so masks do not depend on the mesh) mixed with a 32-bit seed
    drawn from `key` by the lowbias32 integer hash. A few integer ops per element instead of a bit generator."""
    seed = jax.random.bits(key, (), jnp.uint32)
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in range(len(shape) - 1, -1, -1):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    x = index * jnp.uint32(0x9E3779B9) + seed
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    x = x ^ (x >> 16)
    return x >= jnp.uint32(min(round((1.0 - keep) * 2**32), 2**32 - 1))


def _normal(key: jax.Array, shape: tuple[int, ...], dtype, std: float = 0.02) -> jax.Array:
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class LoraWeights(nnx.Module):
    """One adapter's low-rank pair. `lora_a` is Kaiming-uniform like PEFT; `lora_b` starts at zero."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                 in_axis: str | None, out_axis: str | None, salt: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 units: Units | None = None):
        bound = 1.0 / (in_features ** 0.5)  # kaiming_uniform_(a=sqrt(5)) on [r, in] gives U(-1/sqrt(in), 1/sqrt(in))
        a = jax.random.uniform(rngs.params(), (in_features, r), jnp.float32, -bound, bound).astype(dtype)
        self.lora_a = nnx.LoRAParam(a, axes=(in_axis, "lora_rank"), units=units)
        self.lora_b = nnx.LoRAParam(jnp.zeros((r, out_features), dtype), axes=("lora_rank", out_axis), units=units)
        self.r = r
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.salt = salt

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def delta(self, x: jax.Array, dtype) -> jax.Array:
        key = _DROPOUT_KEY.get()
        if key is not None and self.dropout > 0.0:
            if isinstance(x, jax.core.Tracer) and not isinstance(key, jax.core.Tracer):
                # a concrete key captured by a trace is baked into the compiled function: every later call
                # (even outside `lora_dropout`) would reuse the same masks
                raise ValueError("lora_dropout: the key must be an argument of the jitted function that runs the "
                                 "model (e.g. your train step), not a constant captured by its trace; the eager "
                                 "model(...) API does not support dropout, call model.forward inside your own jit")
            module_key = jax.random.fold_in(key, (_SALTS.get() or {}).get(self.salt, self.salt))
            if _DROPOUT_MASKS.get() == "hash":
                keep = hashed_keep_mask(module_key, x.shape, 1.0 - self.dropout)
            else:
                keep = jax.random.bernoulli(module_key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0.0).astype(x.dtype)
        return low_rank_product(x.astype(dtype), self.lora_a[...].astype(dtype), self.lora_b[...].astype(dtype),
                                self.scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def low_rank_product(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """`((x @ a) @ b) * scale` for x [..., in], a [in, r], b [r, out].

    Same values as plain autodiff; the hand-written backward contracts over the tokens as `g^T @ x` (rank-sized
    operand transposed) where autodiff's `x^T @ g` makes XLA:CPU materialise a transposed copy of every big
    activation (~25% of a CPU LoRA train step)."""
    return ((x @ a) @ b) * jnp.asarray(scale, x.dtype)


def _low_rank_fwd(x, a, b, scale):
    h = x @ a
    return (h @ b) * jnp.asarray(scale, x.dtype), (x, a, b, h)


def _low_rank_bwd(scale, residuals, g):
    x, a, b, h = residuals
    rows = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731  [tokens, features]
    gs = g * jnp.asarray(scale, g.dtype)
    grad_b = rows(h).T @ rows(gs)  # [r, out]: the rank-sized operand is the transposed one
    gh = gs @ b.T  # [..., r]
    grad_a = (rows(gh).T @ rows(x)).T  # [in, r]
    return gh @ a.T, grad_a, grad_b


low_rank_product.defvjp(_low_rank_fwd, _low_rank_bwd)


QUANT_TILE = 64


class QuantizedKernel(nnx.Variable):
    """Codes or scales of a quantized frozen kernel (never trained, never saved in adapters)."""


class Linear(nnx.Module):
    """`y = x @ kernel + bias` with kernel [in, out] (PyTorch weight transposed) and optional LoRA adapters."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, axes: Axes, rngs: nnx.Rngs,
                 param_dtype=jnp.float32, dtype=jnp.float32, units: Units | None = None):
        """`units` ((logical axis, size), ...): that axis shards only in whole multiples of `size` (a head's width),
        so a mesh axis never splits one attention head (`cogstream_jax.sharding.logical_to_spec`)."""
        self.in_features, self.out_features = in_features, out_features
        self.kernel = nnx.Param(_normal(rngs.params(), (in_features, out_features), param_dtype), axes=axes,
                                units=units)
        self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype), axes=(axes[1],), units=units)
                     if use_bias else None)
        self.axes = axes
        self.units = units
        self.dtype = dtype
        self.adapters = nnx.Dict()
        self.active_adapter: str | None = None
        self.quant: str | None = None  # "int8" / "nf4" once `quantize` stored the kernel quantized

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, path: str, *, rngs: nnx.Rngs,
                    dtype=jnp.float32) -> None:
        salt = zlib.crc32(path.encode()) & 0x7FFFFFFF
        self.adapters[name] = LoraWeights(self.in_features, self.out_features, r, alpha, dropout,
                                          self.axes[0], self.axes[1], salt, rngs=rngs, dtype=dtype,
                                          units=getattr(self, "units", None))

    def quantize(self, qtype: str) -> None:
        """Store the frozen kernel quantized, QLoRA style (qwix; scales per output channel, NF4 also per tile of
        64 inputs when the input size allows): int8 codes, or NF4 codes packed two per byte. The dense kernel
        is dropped; every call dequantizes it on the fly (the adapters stay in full precision)."""
        import qwix

        kernel = self.kernel[...]
        tiled = {"tiled_axes": {0: QUANT_TILE}} if qtype == "nf4" and kernel.shape[0] % QUANT_TILE == 0 else {}
        q = qwix.quantize(kernel.astype(jnp.float32), qtype, channelwise_axes=(1,), **tiled)
        codes = q.qvalue
        if qtype == "nf4" and kernel.shape[0] % 2 == 0:
            codes = q.qvalue.astype(jnp.uint8)
            codes = codes[0::2] | (codes[1::2] << 4)
        self.kernel_codes = QuantizedKernel(codes, axes=self.axes, units=self.units)
        self.kernel_scale = QuantizedKernel(q.scale, axes=(None, self.axes[1]), units=self.units)
        self.kernel, self.quant = None, qtype

    def dense_kernel(self) -> jax.Array:
        """The kernel [in, out]: stored, or dequantized from its codes."""
        if self.quant is None:
            return self.kernel[...]
        import qwix

        codes = self.kernel_codes[...]
        if codes.dtype == jnp.uint8 and self.quant == "nf4":  # two 4-bit codes per byte along the input axis
            codes = jnp.stack([codes & 15, codes >> 4], axis=1).reshape(self.in_features, self.out_features)
            codes = codes.astype(jnp.uint4)
        return qwix.dequantize(qwix.QArray(codes, self.kernel_scale[...], None, self.quant))

    @property
    def base_sharding(self):
        """Placement of the frozen base weights (the kernel or its codes)."""
        return getattr((self.kernel if self.quant is None else self.kernel_codes)[...], "sharding", None)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype
        y = x.astype(dtype) @ self.dense_kernel().astype(dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        if self.active_adapter is not None:
            y = y + self.adapters[self.active_adapter].delta(x, dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm with weight and bias, statistics in fp32 and the result cast back to the input dtype."""

    def __init__(self, features: int, eps: float, *, axis_name: str, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), axes=(axis_name,))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype), axes=(axis_name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """Qwen2 RMSNorm: normalise in fp32, cast back to the input dtype, then multiply by the weight."""

    def __init__(self, features: int, eps: float, *, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((features,), param_dtype), axes=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * y.astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding table [vocab, hidden] (not scaled)."""

    def __init__(self, num_embeddings: int, features: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 dtype=jnp.float32):
        self.embedding = nnx.Param(_normal(rngs.params(), (num_embeddings, features), param_dtype),
                                   axes=("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)
