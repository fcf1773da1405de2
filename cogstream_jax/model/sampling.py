"""Logits processors of transformers' `generate`, as pure JAX functions usable inside a `lax.while_loop`.

Order and semantics follow transformers (4.46, the official pin, and 5.x alike) for one decoding step:
repetition penalty (over every token id seen so far), then any custom processor (the retrieval
constraint), then the sampling warpers temperature -> top-k -> top-p, then `softmax` + a categorical draw
(or argmax when not sampling). Filtered entries become -inf as in transformers.

The defaults are VideoLLaMA3's `generation_config.json` (T 0.7, top-k 20, top-p 0.8, repetition penalty 1.05);
`SamplingConfig.from_generation_config` reads them from a model folder.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from cogstream_jax.errors import ConfigError
from cogstream_jax.io_utils import read_config_json

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings (hashable: it is a static argument of the jitted decode loop)."""

    do_sample: bool = True
    temperature: float = 0.7
    top_k: int = 20
    top_p: float = 0.8
    repetition_penalty: float = 1.05

    def __post_init__(self):
        if self.temperature <= 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k: must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty: must be > 0, got {self.repetition_penalty}")

    @classmethod
    def from_generation_config(cls, source: str | os.PathLike | dict[str, Any]) -> "SamplingConfig":
        """Read `generation_config.json` (a dict, the file or its folder); missing fields keep transformers'
        own defaults (no sampling filters, no penalty)."""
        source, where = read_config_json(source, "generation_config.json")
        try:
            return cls(do_sample=bool(source.get("do_sample", False)),
                       temperature=float(source.get("temperature", 1.0)),
                       top_k=int(source.get("top_k", 50) or 0),
                       top_p=float(source.get("top_p", 1.0)),
                       repetition_penalty=float(source.get("repetition_penalty", 1.0)))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: invalid sampling field ({e})") from None

    def greedy(self) -> "SamplingConfig":
        """Greedy decoding as `generate(do_sample=False)` with this config: the repetition penalty stays."""
        return dataclasses.replace(self, do_sample=False)


GREEDY = SamplingConfig(do_sample=False, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)


def repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """transformers' RepetitionPenaltyLogitsProcessor: seen tokens' scores / penalty (x penalty when < 0)."""
    if penalty == 1.0:
        return logits
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def temperature(logits: jax.Array, value: float) -> jax.Array:
    return logits if value == 1.0 else logits / value


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """TopKLogitsWarper: drop scores below the k-th largest (ties with it are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits: jax.Array, p: float, min_tokens_to_keep: int = 1) -> jax.Array:
    """TopPLogitsWarper on [B, V]: sort ascending, drop tokens whose cumulative probability is <= 1 - p (the
    `min_tokens_to_keep` most likely always stay)."""
    if p >= 1.0:
        return logits
    order = jnp.argsort(logits, axis=-1)
    ascending = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted = remove_sorted.at[..., -min_tokens_to_keep:].set(False)
    rows = jnp.arange(logits.shape[0])[:, None]
    remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
    return jnp.where(remove, NEG_INF, logits)


def process_logits(logits: jax.Array, seen: jax.Array, config: SamplingConfig,
                   allowed: jax.Array | None = None) -> jax.Array:
    """All processors of one step on fp32 logits [B, V]; `seen` [B, V] bool, `allowed` [V] bool or None."""
    logits = repetition_penalty(logits.astype(jnp.float32), seen, config.repetition_penalty)
    if allowed is not None:
        logits = jnp.where(allowed, logits, NEG_INF)
    if config.do_sample:
        logits = top_p_filter(top_k_filter(temperature(logits, config.temperature), config.top_k), config.top_p)
    return logits


def choose_tokens(logits: jax.Array, seen: jax.Array, config: SamplingConfig, key: jax.Array,
                  allowed: jax.Array | None = None) -> jax.Array:
    """Next token ids [B]: processed logits, then a categorical draw (sampling) or argmax (greedy)."""
    processed = process_logits(logits, seen, config, allowed)
    if config.do_sample:
        return jax.random.categorical(key, processed, axis=-1).astype(jnp.int32)
    return jnp.argmax(processed, axis=-1).astype(jnp.int32)


def mark_seen(seen: jax.Array, tokens: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Set seen[b, tokens[b, j]] for every valid position (tokens [B, L] or [B])."""
    tokens = tokens.reshape(tokens.shape[0], -1)
    valid = jnp.ones(tokens.shape, bool) if valid is None else valid.reshape(tokens.shape).astype(bool)
    rows = jnp.broadcast_to(jnp.arange(tokens.shape[0])[:, None], tokens.shape)
    return seen.at[rows, tokens].max(valid)
