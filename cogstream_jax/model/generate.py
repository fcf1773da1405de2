"""Greedy generation: one jitted prefill and one jitted decode loop (`lax.while_loop`) on a functional cache.

Positions follow transformers' `generate`: `cumsum(attention_mask) - 1` (1 on padding), so left-padded batches
decode exactly like the reference. Rows that emitted an EOS id keep emitting `pad_token_id`.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cogstream_jax.model.qwen2 import KVCache
from cogstream_jax.model.videollama3 import check_inputs

DEFAULT_EOS = (151645, 151643)


def generation_positions(attention_mask: np.ndarray) -> np.ndarray:
    """Positions of prompt tokens as transformers' generate derives them from the attention mask."""
    pos = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask == 0, 1, pos).astype(np.int32)


def greedy_generate(model, input_ids, *, max_new_tokens: int, pixel_values=None, grid_sizes=None, merge_sizes=None,
                    compression_mask=None, attention_mask=None, eos_token_ids: Sequence[int] = DEFAULT_EOS,
                    pad_token_id: int | None = None, cache_dtype=None) -> np.ndarray:
    """Return the generated ids [B, max_new_tokens] (pad after EOS), greedy as `generate(do_sample=False)`."""
    input_ids = np.asarray(input_ids, np.int32)
    b, length = input_ids.shape
    layout, num_kept = check_inputs(model.config, input_ids, pixel_values, grid_sizes, merge_sizes, compression_mask)
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    pad = int(eos_token_ids[0] if pad_token_id is None else pad_token_id)
    graphdef, state = nnx.split(model)
    cache = KVCache.init(model.config.text, b, length + max_new_tokens, cache_dtype or model.dtype)
    first, cache = _prefill(graphdef, state, jnp.asarray(input_ids), None if pixel_values is None else
                            jnp.asarray(pixel_values), None if compression_mask is None else
                            jnp.asarray(compression_mask, bool), jnp.asarray(mask),
                            jnp.asarray(generation_positions(mask)), cache, layout=layout, num_kept=num_kept)
    next_pos = jnp.asarray(mask.sum(-1), jnp.int32)
    out = _decode(graphdef, state, cache, first, next_pos, jnp.asarray(tuple(eos_token_ids), jnp.int32),
                  jnp.int32(pad), max_new_tokens=max_new_tokens)
    return np.asarray(out)


@functools.partial(jax.jit, static_argnames=("graphdef", "layout", "num_kept"), donate_argnames=("cache",))
def _prefill(graphdef, state, input_ids, pixel_values, compression_mask, attention_mask, positions, cache, *,
             layout, num_kept):
    model = nnx.merge(graphdef, state)
    b, length = input_ids.shape
    last = jnp.full((b, 1), length - 1, jnp.int32)
    out = model.forward(input_ids, pixel_values=pixel_values, layout=layout, compression_mask=compression_mask,
                        num_kept=num_kept, attention_mask=attention_mask, positions=positions, cache=cache,
                        logits_positions=last)
    return jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32), out.cache


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"), donate_argnames=("cache",))
def _decode(graphdef, state, cache, first, next_pos, eos_ids, pad_id, *, max_new_tokens):
    model = nnx.merge(graphdef, state)
    b = first.shape[0]
    tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos_ids)

    def cond(carry):
        step, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, tokens, done, pos = carry
        prev = tokens[:, step - 1]
        out = model.forward(prev[:, None], positions=pos[:, None], attention_mask=jnp.ones((b, 1), jnp.int32),
                            cache=cache)
        nxt = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, pad_id, nxt)
        tokens = tokens.at[:, step].set(nxt)
        return step + 1, out.cache, tokens, done | jnp.isin(nxt, eos_ids), pos + 1

    carry = (jnp.int32(1), cache, tokens, done, next_pos)
    _, _, tokens, _, _ = jax.lax.while_loop(cond, body, carry)
    return tokens
