"""Prompt-prefix KV reuse for a conversation whose prompts grow question after question (batch of one).

Every question of a stream re-sends what the previous one sent: the retrieval prompt's instructions, demos and
earlier history pairs; the answer prompt's system turn, earlier clips, questions and answers. The official code
prefills all of it again, so its latency grows with the stream. `PrefixCache` keeps the KV cache of the last
call (its prompt and the generated tokens fed back) with a content key per cache slot, and `generate_with_prefix`
prefills only from the first slot whose key differs from the new prompt's, then decodes as `generate` does.

Keys: the token id for text; for visual placeholders a key the caller gives per feature row (its provenance,
e.g. `(segment uid, row)`), because a placeholder id says nothing about the features it carries. Slots that
hold padding (the bucket rounding of the last prefill) carry `None` and are skipped when matching; before the next
prefill the kept slots are moved to the front, so pads never pile up over a long stream. Positions come from the
token count, not the slot.

Results equal a fresh `generate` up to float rounding (attention may sum in another order); tests compare both on
growing prompts with and without visual rows. Keep one `PrefixCache` per set of
weights (per adapter): a cache filled under one adapter is wrong under another.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cogstream_jax.errors import InputError
from cogstream_jax.model.generate import (DEFAULT_EOS, bucket_length, decode_loop, generate, prefill,
                                          prefill_empty_cache, sampling_masks)
from cogstream_jax.model.sampling import GREEDY, SamplingConfig
from cogstream_jax.model.qwen2 import KVCache

MIN_CAPACITY = 256


@dataclasses.dataclass
class PrefixCache:
    """The last call's KV cache and one content key per written slot (`None`: padding)."""

    cache: KVCache | None = None
    keys: list[Hashable | None] = dataclasses.field(default_factory=list)
    reused_tokens: int = 0  # of the last call (for timings / tests)

    def clear(self) -> None:
        self.cache, self.keys, self.reused_tokens = None, [], 0

    def match(self, prompt_keys: Sequence[Hashable]) -> tuple[int, int]:
        """(prompt tokens whose K/V can be reused, the slot where the new tokens go). At least the last prompt
        token is always recomputed: its logits start the generation."""
        reused, slot = 0, 0
        for index, key in enumerate(self.keys):
            if key is None:
                continue
            if reused >= len(prompt_keys) - 1 or key != prompt_keys[reused]:
                break
            reused, slot = reused + 1, index + 1
        return reused, slot


def prompt_keys(input_ids: np.ndarray, placeholder_ids: Sequence[int], visual_keys: Sequence[Hashable]
                ) -> list[Hashable]:
    """One key per prompt position: the id for text, the next visual row's key for a placeholder."""
    is_visual = np.isin(input_ids, list(placeholder_ids))
    if int(is_visual.sum()) > len(visual_keys):
        raise InputError(f"visual_keys: {len(visual_keys)} keys for {int(is_visual.sum())} visual placeholders")
    rows = iter(visual_keys)
    return [("visual", next(rows)) if v else int(t) for t, v in zip(input_ids.tolist(), is_visual.tolist())]


def generate_with_prefix(model, prefix: PrefixCache | None, input_ids, *, max_new_tokens: int,
                         visual_features=None, visual_keys: Sequence[Hashable] = (),
                         sampling: SamplingConfig = GREEDY, key: jax.Array | None = None,
                         allowed_token_ids: Sequence[int] | None = None, penalize_prompt: bool = True,
                         eos_token_ids: Sequence[int] = DEFAULT_EOS, pad_token_id: int | None = None) -> np.ndarray:
    """`generate` for one prompt [1, L] (precomputed `visual_features` rows fill the placeholders in order),
    reusing and then updating `prefix`. Returns the generated ids [1, max_new_tokens] (pad after EOS).
    `prefix=None` keeps nothing: a plain bucketed `generate` (the official full prefill)."""
    if prefix is None:
        return generate(model, input_ids, max_new_tokens=max_new_tokens, visual_features=visual_features,
                        sampling=sampling, key=key, allowed_token_ids=allowed_token_ids,
                        penalize_prompt=penalize_prompt, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
                        bucket=True)
    input_ids = np.asarray(input_ids, np.int32)
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise InputError(f"input_ids: prefix reuse takes one prompt [1, length], got shape {input_ids.shape}")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    config = model.config
    keys = prompt_keys(input_ids[0], config.placeholder_ids, visual_keys)
    reused, start = prefix.match(keys)
    length, new = input_ids.shape[1], input_ids.shape[1] - reused
    padded = bucket_length(new)
    pad = int(eos_token_ids[0] if pad_token_id is None else pad_token_id)

    ids = np.full((1, padded), pad, np.int32)
    ids[0, :new] = input_ids[0, reused:]
    mask = (np.arange(padded) < new).astype(np.int32)[None]
    features, num_kept = _new_rows(config, input_ids[0], reused, visual_features)
    seen, allowed = sampling_masks(config.text.vocab_size, input_ids, np.ones_like(input_ids), sampling,
                                   allowed_token_ids, penalize_prompt)
    key = jax.random.PRNGKey(0) if key is None else key
    kept = [slot for slot in range(start) if prefix.keys[slot] is not None]  # the `reused` slots, pads dropped
    cache, kept_keys = prefix.cache, [prefix.keys[slot] for slot in kept]
    prefix.clear()  # the cache is donated below: a call that fails leaves an empty (valid) prefix behind
    cache = _kept_prefix(cache, config.text, kept, reused + padded + max_new_tokens, model.dtype)
    graphdef, state = nnx.split(model)
    positions = jnp.asarray(reused + np.arange(padded, dtype=np.int32)[None])
    # nothing kept: the prompt attends to itself only, which the fused kernels run (splash / cuDNN)
    fill = prefill_empty_cache if not kept else prefill
    first, cache, seen = fill(graphdef, state, jnp.asarray(ids), None, features, None, jnp.asarray(mask), positions,
                              jnp.full((1, 1), new - 1, jnp.int32), cache, jnp.asarray(seen), allowed, key,
                              layout=None, num_kept=num_kept, sampling=sampling)
    tokens, cache, fed = decode_loop(graphdef, state, cache, first, jnp.full((1,), length, jnp.int32), seen,
                                     allowed, key, jnp.asarray(tuple(eos_token_ids), jnp.int32), jnp.int32(pad),
                                     max_new_tokens=max_new_tokens, sampling=sampling)
    tokens = np.asarray(tokens)
    fed = int(fed)
    prefix.cache = cache
    prefix.keys = kept_keys + keys[reused:] + [None] * (padded - new) + tokens[0, :fed].tolist()
    prefix.reused_tokens = reused
    return tokens


def _new_rows(config, input_ids: np.ndarray, reused: int, visual_features) -> tuple[jax.Array | None, int | None]:
    """The feature rows of the placeholders in the recomputed part, padded to a bucketed row count."""
    placeholders = np.isin(input_ids, list(config.placeholder_ids))
    needed = int(placeholders[reused:].sum())
    if not needed:
        return None, None
    if visual_features is None:
        raise InputError(f"input_ids hold {needed} visual placeholders but no visual_features were given")
    offset = int(placeholders[:reused].sum())
    if visual_features.shape[0] < offset + needed:
        raise InputError(f"visual_features: {visual_features.shape[0]} rows cannot fill {offset + needed} "
                         "placeholders")
    rows = jnp.asarray(visual_features)[offset:offset + needed]
    bucket = bucket_length(needed)
    return jnp.pad(rows, ((0, bucket - needed), (0, 0))), bucket


def _kept_prefix(cache: KVCache | None, text_config, kept: Sequence[int], needed: int, dtype) -> KVCache:
    """The cache holding only the slots `kept`, moved in order to the front (later slots invalid, writing resumes
    after them), with room for `needed` slots: grown (capacity bucketed) when too small."""
    if cache is None:
        return KVCache.init(text_config, 1, bucket_length(needed, MIN_CAPACITY), dtype)
    extra = 0 if cache.length >= needed else bucket_length(needed, MIN_CAPACITY) - cache.length
    order = np.zeros(cache.length, np.int32)  # a fixed shape per capacity: no new compile per question
    order[:len(kept)] = kept
    return _compact(cache, jnp.asarray(order), jnp.int32(len(kept)), extra)


@functools.partial(jax.jit, static_argnums=(3,), donate_argnums=(0,))
def _compact(cache: KVCache, order: jax.Array, count: jax.Array, extra: int) -> KVCache:
    slots = ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0))
    k, v = jnp.take(cache.k, order, axis=2), jnp.take(cache.v, order, axis=2)
    keep = jnp.arange(cache.length + extra) < count
    valid = jnp.broadcast_to(keep, cache.valid.shape[:1] + keep.shape)
    return KVCache(k=jnp.pad(k, slots), v=jnp.pad(v, slots), valid=valid, index=count)
