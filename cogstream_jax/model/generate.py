"""Generation: one jitted prefill and one jitted decode loop (`lax.while_loop`) on a functional KV cache.

- Positions follow transformers' `generate`: `cumsum(attention_mask) - 1` (1 on padding), so left-padded
  batches decode exactly like the reference. Rows that emitted an EOS id keep emitting `pad_token_id`.
- Every step runs `cogstream_jax.model.sampling` (repetition penalty, an optional allowed-id constraint,
  temperature / top-k / top-p, then a categorical draw or argmax), like transformers' logits processors.
  `penalize_prompt=False` reproduces a `generate(inputs_embeds=...)` call, where transformers' repetition
  penalty only sees the generated ids (the official CogReasoner answer call).
- Randomness comes from one `key` per call, folded with the step number: the caller seeds per (video, QA), so
  results do not depend on how work is split across processes.
- `bucket=True` left-pads the prompt (and the visual feature rows) to a few fixed lengths, so a growing
  stream compiles a handful of shapes instead of one per question; padding is masked, so outputs are unchanged.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cogstream_jax.errors import InputError
from cogstream_jax.model.sampling import GREEDY, SamplingConfig, choose_tokens, mark_seen
from cogstream_jax.model.qwen2 import KVCache
from cogstream_jax.model.videollama3 import check_inputs

DEFAULT_EOS = (151645, 151643)
MIN_BUCKET = 64


def generation_positions(attention_mask: np.ndarray) -> np.ndarray:
    """Positions of prompt tokens as transformers' generate derives them from the attention mask."""
    pos = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask == 0, 1, pos).astype(np.int32)


def bucket_length(n: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest of minimum * {1, 1.5, 2, 3, 4, 6, ...} that is >= n (at most 50% padding)."""
    size = minimum
    while True:
        if size >= n:
            return size
        if size * 3 // 2 >= n:
            return size * 3 // 2
        size *= 2


def left_pad(input_ids: np.ndarray, mask: np.ndarray, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    extra = length - input_ids.shape[1]
    if extra <= 0:
        return input_ids, mask
    return (np.pad(input_ids, ((0, 0), (extra, 0)), constant_values=pad_id),
            np.pad(mask, ((0, 0), (extra, 0)), constant_values=0))


def generate(model, input_ids, *, max_new_tokens: int, pixel_values=None, grid_sizes=None, merge_sizes=None,
             compression_mask=None, visual_features=None, attention_mask=None,
             sampling: SamplingConfig = GREEDY, key: jax.Array | None = None,
             allowed_token_ids: Sequence[int] | None = None, penalize_prompt: bool = True,
             eos_token_ids: Sequence[int] = DEFAULT_EOS, pad_token_id: int | None = None, cache_dtype=None,
             bucket: bool = False) -> np.ndarray:
    """Return the generated ids [B, max_new_tokens] (pad after EOS).

    Visual input is either raw `pixel_values` (+ grids, optional DiffFP `compression_mask`) or precomputed,
    already-compressed projected `visual_features` [n, D] filling the placeholders in order (n may exceed the
    placeholder count; extra rows are ignored).
    """
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    input_ids = np.asarray(input_ids, np.int32)
    if input_ids.ndim != 2:
        raise InputError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    pad = int(eos_token_ids[0] if pad_token_id is None else pad_token_id)
    features = None
    if visual_features is not None:
        if pixel_values is not None:
            raise InputError("give either pixel_values or visual_features, not both")
        features = np.asarray(visual_features) if not isinstance(visual_features, jax.Array) else visual_features
        slots = int(np.isin(input_ids, model.config.placeholder_ids).sum())
        if features.ndim != 2 or features.shape[0] < slots:
            raise InputError(f"visual_features: shape {tuple(features.shape)} cannot fill {slots} placeholders")
        layout, num_kept = None, None
    else:
        layout, num_kept = check_inputs(model.config, input_ids, pixel_values, grid_sizes, merge_sizes,
                                        compression_mask)
    if bucket:
        input_ids, mask = left_pad(input_ids, mask, bucket_length(input_ids.shape[1]), pad)
        if features is not None and features.shape[0]:
            rows = bucket_length(features.shape[0])
            features = jnp.pad(jnp.asarray(features), ((0, rows - features.shape[0]), (0, 0)))
    if features is not None:
        num_kept = int(features.shape[0])
        features = jnp.asarray(features)
    b, length = input_ids.shape
    seen, allowed = sampling_masks(model.config.text.vocab_size, input_ids, mask, sampling, allowed_token_ids,
                                   penalize_prompt)
    key = jax.random.PRNGKey(0) if key is None else key
    graphdef, state = nnx.split(model)
    cache = KVCache.init(model.config.text, b, length + max_new_tokens, cache_dtype or model.dtype)
    first, cache, seen = prefill_empty_cache(
        graphdef, state, jnp.asarray(input_ids), None if pixel_values is None else jnp.asarray(pixel_values),
        features, None if compression_mask is None else jnp.asarray(compression_mask, bool), jnp.asarray(mask),
        jnp.asarray(generation_positions(mask)), jnp.full((b, 1), length - 1, jnp.int32), cache, jnp.asarray(seen),
        allowed, key, layout=layout, num_kept=num_kept, sampling=sampling)
    next_pos = jnp.asarray(mask.sum(-1), jnp.int32)
    out, _, _ = decode_loop(graphdef, state, cache, first, next_pos, seen, allowed, key,
                            jnp.asarray(tuple(eos_token_ids), jnp.int32), jnp.int32(pad),
                            max_new_tokens=max_new_tokens, sampling=sampling)
    return np.asarray(out)


def sampling_masks(vocab: int, input_ids: np.ndarray, mask: np.ndarray, sampling: SamplingConfig,
                   allowed_token_ids: Sequence[int] | None, penalize_prompt: bool
                   ) -> tuple[np.ndarray, jax.Array | None]:
    """The repetition penalty's seen-token mask [B, vocab] (prompt tokens when `penalize_prompt`) and the
    optional allowed-id mask [vocab]."""
    b = input_ids.shape[0]
    seen = np.zeros((b, vocab), bool)
    if penalize_prompt and sampling.repetition_penalty != 1.0:
        rows = np.broadcast_to(np.arange(b)[:, None], input_ids.shape)
        seen[rows[mask == 1], input_ids[mask == 1]] = True
    allowed = None
    if allowed_token_ids is not None:
        allowed = np.zeros(vocab, bool)
        allowed[np.asarray(list(allowed_token_ids), np.int64)] = True
        allowed = jnp.asarray(allowed)
    return seen, allowed


def greedy_generate(model, input_ids, *, max_new_tokens: int, **kwargs) -> np.ndarray:
    """Greedy as `generate(do_sample=False)` without repetition penalty (the model issue's API)."""
    kwargs.setdefault("sampling", GREEDY)
    return generate(model, input_ids, max_new_tokens=max_new_tokens, **kwargs)


def _prefill(graphdef, state, input_ids, pixel_values, visual_features, compression_mask, attention_mask,
             positions, last, cache, seen, allowed, key, *, layout, num_kept, sampling, fresh):
    """Write the prompt's K/V into `cache` (at its index) and pick the first token from the logits at `last`
    [B, 1] (the last real prompt position). `fresh`: the cache is empty, so the prompt attends to itself only
    (self-attention: the fused kernels of `attention.attend`)."""
    model = nnx.merge(graphdef, state)
    out = model.forward(input_ids, pixel_values=pixel_values, layout=layout, visual_features=visual_features,
                        compression_mask=compression_mask, num_kept=num_kept, attention_mask=attention_mask,
                        positions=positions, cache=cache, cache_is_empty=fresh, logits_positions=last)
    first = choose_tokens(out.logits[:, -1], seen, sampling, jax.random.fold_in(key, 0), allowed)
    return first, out.cache, mark_seen(seen, first)


_PREFILL_STATIC = dict(static_argnames=("graphdef", "layout", "num_kept", "sampling"), donate_argnames=("cache",))


@functools.partial(jax.jit, **_PREFILL_STATIC)
def prefill(graphdef, state, input_ids, pixel_values, visual_features, compression_mask, attention_mask, positions,
            last, cache, seen, allowed, key, *, layout, num_kept, sampling):
    """The prompt after what `cache` already holds (a kept prefix, or nothing): attention against the cache,
    which takes the XLA path (an offset causal mask over the cache slots)."""
    return _prefill(graphdef, state, input_ids, pixel_values, visual_features, compression_mask, attention_mask,
                    positions, last, cache, seen, allowed, key, layout=layout, num_kept=num_kept, sampling=sampling,
                    fresh=False)


@functools.partial(jax.jit, **_PREFILL_STATIC)
def prefill_empty_cache(graphdef, state, input_ids, pixel_values, visual_features, compression_mask, attention_mask,
                        positions, last, cache, seen, allowed, key, *, layout, num_kept, sampling):
    """The prompt into an empty cache: self-attention over the prompt alone, so the fused kernels (splash on TPU,
    cuDNN on GPU) run it. Its own jitted function, so compile logs and compile-check name the two apart."""
    return _prefill(graphdef, state, input_ids, pixel_values, visual_features, compression_mask, attention_mask,
                    positions, last, cache, seen, allowed, key, layout=layout, num_kept=num_kept, sampling=sampling,
                    fresh=True)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling"), donate_argnames=("cache",))
def decode_loop(graphdef, state, cache, first, next_pos, seen, allowed, key, eos_ids, pad_id, *, max_new_tokens,
                sampling):
    """Tokens [B, max_new_tokens] after `first`, the cache, and how many tokens were fed (their K/V written at
    slots [cache.index, cache.index + fed)): every generated token but the last."""
    model = nnx.merge(graphdef, state)
    b = first.shape[0]
    tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos_ids)

    def cond(carry):
        step, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, tokens, done, pos, seen = carry
        prev = tokens[:, step - 1]
        out = model.forward(prev[:, None], positions=pos[:, None], attention_mask=jnp.ones((b, 1), jnp.int32),
                            cache=cache)
        nxt = choose_tokens(out.logits[:, -1], seen, sampling, jax.random.fold_in(key, step), allowed)
        nxt = jnp.where(done, pad_id, nxt)
        tokens = tokens.at[:, step].set(nxt)
        return step + 1, out.cache, tokens, done | jnp.isin(nxt, eos_ids), pos + 1, mark_seen(seen, nxt)

    carry = (jnp.int32(1), cache, tokens, done, next_pos, seen)
    step, cache, tokens, _, _, _ = jax.lax.while_loop(cond, body, carry)
    return tokens, cache, step - 1
