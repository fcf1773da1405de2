"""Question-aware event compression (protocol 6.1-6.3, official `select_events_based_on_summary`).

Above 135 frames the stream's frames are clustered into ceil(T/15) events (time-aware k-means). Each event's
summary prompt (`Time t:` + P `<image>` per member frame, the official instruction) is run through the LLM with
the event's projected frame features in the `<image>` slots; the event vector is the mean of the last hidden
state (after the final norm) over all positions. The raw question (no template, at most 128 tokens) is embedded
the same way. Events with cosine < 0.45 are unimportant; their frames except the 2 representative frames per
cluster become minor frames: token 0 carries the frame's mean feature and only token 0 survives the mask.

The official code runs one forward per event per question; here all event prompts AND the question run as ONE
packed sequence, each prompt its own segment (block-diagonal causal attention, positions from 0): the same
numbers as separate forwards, one program for any event count. An event left empty by k-means is skipped (the
official code crashes, protocol 7 #9).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cogstream_jax.data.prompts import event_summary_prompt
from cogstream_jax.errors import InputError
from cogstream_jax.inference.kmeans import MIN_EVENTS, KMeansResult, num_events, time_kmeans
from cogstream_jax.model.generate import bucket_length
from cogstream_jax.multihost import to_host

COSINE_THRESHOLD = 0.45
QUESTION_MAX_TOKENS = 128
SEGMENT_MULTIPLE = 64  # event-scoring rows (events + question, ceil(T/15) + 1) per program: up to 945 frames
EMBED_CHOICES = ("full_module", "answer", "retrieval", "base")


@dataclass(frozen=True)
class EventCompression:
    """Minor frames (global indices, ascending) and what produced them (None fields when it did not run)."""

    minor_frames: tuple[int, ...]
    cosine: np.ndarray | None = None  # [K] (nan for empty events)
    clusters: KMeansResult | None = None


NO_COMPRESSION = EventCompression(())


def should_compress(num_frames: int) -> bool:
    """Only when memory_length = ceil(T/15) > 9, i.e. more than 135 frames (as official)."""
    return num_events(num_frames) >= MIN_EVENTS


def minor_frames_from_scores(assignments: np.ndarray, representatives: np.ndarray, cosine: np.ndarray,
                             threshold: float = COSINE_THRESHOLD) -> tuple[int, ...]:
    """Frames of events with cosine < threshold, minus every cluster's representative frames."""
    assignments = np.asarray(assignments)
    unimportant = np.nonzero(np.asarray(cosine) < threshold)[0]
    kept = {int(i) for i in np.asarray(representatives).reshape(-1) if i >= 0}
    return tuple(int(f) for f in np.nonzero(np.isin(assignments, unimportant))[0] if int(f) not in kept)


def pool_minor_frames(features: jax.Array, minor_frames: Sequence[int], tokens_per_frame: int) -> jax.Array:
    """Token 0 of each minor frame := mean of that frame's tokens (official compress_unimportant_events)."""
    if not len(minor_frames):
        return features
    frames = features.reshape(-1, tokens_per_frame, features.shape[-1])
    idx = jnp.asarray(list(minor_frames), jnp.int32)
    pooled = frames[idx].astype(jnp.float32).mean(axis=1).astype(frames.dtype)
    return frames.at[idx, 0].set(pooled).reshape(features.shape)


def event_batch(tokenizer: Any, timestamps: Sequence[float], tokens_per_frame: int, clusters: KMeansResult,
                question: str) -> tuple[np.ndarray, np.ndarray, list[int], np.ndarray]:
    """(ids [rows, L], mask [rows, L], non-empty event ids, frame order): one right-padded row per non-empty
    event (members in time order) plus the question as the last row; `frame order` lists the frames whose
    features fill the `<image>` slots, row after row."""
    rows, events, order = [], [], []
    for k in range(len(clusters.center_times)):
        members = np.nonzero(clusters.assignments == k)[0]
        if not len(members):
            continue
        prompt = event_summary_prompt([timestamps[i] for i in members], tokens_per_frame)
        rows.append(tokenizer(prompt)["input_ids"])
        events.append(k)
        order.extend(members.tolist())
    rows.append(tokenizer(question)["input_ids"][:QUESTION_MAX_TOKENS])
    length = bucket_length(max(len(r) for r in rows))
    pad = 0
    ids = np.full((len(rows), length), pad, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids, mask, events, np.asarray(order, np.int64)


def segment_means(hidden: jax.Array, valid: jax.Array, segments: jax.Array, num_segments: int) -> jax.Array:
    """hidden [T, D], valid [T], segments [T] -> fp32 mean over each segment's valid positions [num_segments, D]."""
    weights = valid.astype(jnp.float32)
    sums = jax.ops.segment_sum(hidden.astype(jnp.float32) * weights[:, None], segments, num_segments=num_segments)
    counts = jax.ops.segment_sum(weights, segments, num_segments=num_segments)
    return sums / jnp.maximum(counts, 1.0)[:, None]


@functools.partial(jax.jit, static_argnames=("graphdef", "num_segments"))
def _pooled(graphdef, state, ids, features, valid, positions, segments, num_segments):
    model = nnx.merge(graphdef, state)
    out = model.forward(ids, visual_features=features, num_kept=features.shape[0], attention_mask=valid,
                        positions=positions, segment_ids=segments, compute_logits=False)
    return segment_means(out.hidden_states[0], valid[0], segments[0], num_segments)


def pack_segments(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded rows [rows, L] -> ONE packed sequence (ids, positions from 0 per row, segment = row index),
    unpadded: each row's real tokens, row after row."""
    lengths = np.asarray(mask, bool).sum(1)
    if not all(np.asarray(mask[r, :n], bool).all() for r, n in enumerate(lengths)):
        raise InputError("event-scoring rows must be right-padded (each row's real tokens first)")
    packed = np.concatenate([np.asarray(ids[r, :n], np.int32) for r, n in enumerate(lengths)])
    positions = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
    segments = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    return packed, positions, segments


def segment_count(rows: int) -> int:
    """Segments a scoring program is compiled for: `rows` rounded up to SEGMENT_MULTIPLE."""
    return max(SEGMENT_MULTIPLE, -(-rows // SEGMENT_MULTIPLE) * SEGMENT_MULTIPLE)


def pooled_hidden(model, ids: np.ndarray, mask: np.ndarray, features: jax.Array | None) -> np.ndarray:
    """Mean of the final-norm hidden states over each row's real tokens: [rows, D].

    The right-padded rows are packed into ONE sequence (each row its own segment: block-diagonal causal
    attention, positions from 0), padded to a `bucket_length`, and the features to another (slots take them in
    order, so features past the last slot are never read). The stream's frame count, the event count and the
    longest event change from question to question; packed, only the total length keys a program, and the total
    is about the stream's visual-token budget, so one program usually serves a whole run."""
    packed_ids, packed_positions, packed_segments = pack_segments(ids, mask)
    rows, total = len(ids), len(packed_ids)
    length = bucket_length(total)
    packed, positions, segments = (np.zeros((1, length), np.int32) for _ in range(3))
    packed[0, :total], positions[0, :total], segments[0, :total] = packed_ids, packed_positions, packed_segments
    valid = (np.arange(length) < total)[None].astype(np.int32)
    if features is None:
        features = jnp.zeros((1, model.config.text.hidden_size), model.dtype)
    features = jnp.asarray(features)
    features = jnp.pad(features, ((0, bucket_length(features.shape[0]) - features.shape[0]), (0, 0)))
    graphdef, state = nnx.split(model)
    out = _pooled(graphdef, state, jnp.asarray(packed), features, jnp.asarray(valid), jnp.asarray(positions),
                  jnp.asarray(segments), segment_count(rows))
    return to_host(out)[:rows]


def cosine(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """torch.nn.functional.cosine_similarity(a[None], b, dim=1)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (b @ a) / np.maximum(np.linalg.norm(a) * np.linalg.norm(b, axis=1), eps)


def compress_events(model, tokenizer: Any, features: jax.Array, timestamps: Sequence[float], question: str,
                    key: jax.Array, *, threshold: float = COSINE_THRESHOLD, scores: np.ndarray | None = None
                    ) -> EventCompression:
    """Minor frames for one question. `features` [T*P, D] are the projected features of every frame in order;
    the model's active adapter embeds events and question. `scores` injects the per-event cosines (tests)."""
    t = len(timestamps)
    if not should_compress(t):
        return NO_COMPRESSION
    if features.shape[0] % t:
        raise InputError(f"features: {features.shape[0]} visual tokens are not a multiple of {t} frames")
    per_frame = features.shape[0] // t
    clusters = time_kmeans(features.reshape(t, per_frame, -1), np.asarray(timestamps, np.float32), num_events(t),
                           key)
    if scores is None:
        ids, mask, events, order = event_batch(tokenizer, timestamps, per_frame, clusters, question)
        frames = features.reshape(t, per_frame, -1)[jnp.asarray(order)].reshape(-1, features.shape[-1])
        pooled = pooled_hidden(model, ids, mask, frames)
        scores = np.full(len(clusters.center_times), np.nan)
        scores[events] = cosine(pooled[-1], pooled[:-1])
    minor = minor_frames_from_scores(clusters.assignments, clusters.representatives, scores, threshold)
    return EventCompression(minor, np.asarray(scores), clusters)


def embedding_adapter(choice: str, retrieval: str | None, answer: str | None) -> str | None:
    """Adapter name that embeds events and the question: `full_module`/`answer` (official), `retrieval` or `base`."""
    if choice not in EMBED_CHOICES:
        raise InputError(f"embed_with: expected one of {', '.join(EMBED_CHOICES)}, got {choice!r}")
    return {"full_module": answer, "answer": answer, "retrieval": retrieval, "base": None}[choice]


def override_minor_frames(clip_masks: Sequence[np.ndarray], minor_frames: Sequence[int]) -> np.ndarray:
    """Flattened DiffFP mask of all clips with minor frames reduced to token 0 (spec 6.1 step 5).

    `clip_masks` are each clip's DiffFP keep mask [t, tokens] (computed once per clip); a single-frame clip is an
    image for the official mask and is never overridden."""
    minor = set(int(i) for i in minor_frames)
    out, base = [], 0
    for keep in clip_masks:
        keep = np.array(keep, dtype=bool)
        if keep.shape[0] > 1:
            for f in range(keep.shape[0]):
                if base + f in minor:
                    keep[f] = False
                    keep[f, 0] = True
        out.append(keep.reshape(-1))
        base += keep.shape[0]
    return np.concatenate(out) if out else np.zeros(0, bool)
