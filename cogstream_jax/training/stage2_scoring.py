"""Question-aware event scoring (protocol 6.1-6.2) of a stage-2 call's QAs: every row in ONE device program.

For each QA that needs it (> 135 frames), on the process holding its row: its projected frame tokens (current
adapter, `Stage2Device.project_rows`, on the row's device) -> time-aware k-means there (a single-device program)
-> the event prompts and the question packed as one sequence (`events.pack_segments`). Then every process calls
one program over all rows (vmapped per row, rows split over data x fsdp as in the gradient): the LLM with the
current adapter and the mean of its final hidden states per segment. Each process reads back its own rows' means
and turns them into cosines and minor frames. The same numbers as `events.compress_events` QA by QA (tests); one
program call per device call, whatever its rows' event counts and lengths (padded to a common `scoring_length`
that all processes agree on), where separate calls per QA would make every process wait for every other's QAs.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from cogstream_jax.errors import InputError
from cogstream_jax.inference.events import (cosine, event_batch, minor_frames_from_scores, pack_segments,
                                            segment_means)
from cogstream_jax.inference.kmeans import KMeansResult, num_events, time_kmeans
from cogstream_jax.model.generate import bucket_length
from cogstream_jax.training.step import BATCH_AXES, embed_with_slots

SCORING_KEYS = ("ids", "positions", "segments", "valid", "slot_source")
FINE_ABOVE, FINE_STEP = 4096, 1024


def scoring_length(n: int) -> int:
    """A scoring call's packed length: `bucket_length` (1.5x steps) up to FINE_ABOVE tokens, multiples of FINE_STEP
    above. A 180-frame stream packs about 16.4k-19.4k tokens (its 16,384-token visual budget plus the prompts),
    which 1.5x steps would pad to 24,576: a quarter to a half more LLM work on every scored QA."""
    return bucket_length(n) if n <= FINE_ABOVE else -(-n // FINE_STEP) * FINE_STEP


@dataclasses.dataclass
class ScoringRow:
    """One QA's packed scoring sequence: event prompts (non-empty events in order), then the question."""

    ids: np.ndarray
    positions: np.ndarray
    segments: np.ndarray
    slot_source: np.ndarray  # [n] the row's visual token (original order) filling each slot, -1 for text
    clusters: KMeansResult
    events: list[int]

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def num_segments(self) -> int:
        return len(self.events) + 1


def scoring_row(projected: jax.Array, timestamps, question: str, tokenizer: Any, key: jax.Array,
                placeholder_ids) -> ScoringRow:
    """`projected` [T * P, D]: one QA's projected visual tokens of every frame in order (on one device)."""
    t = len(timestamps)
    if projected.shape[0] % t:
        raise InputError(f"features: {projected.shape[0]} visual tokens are not a multiple of {t} frames")
    per_frame = projected.shape[0] // t
    clusters = time_kmeans(projected.reshape(t, per_frame, -1), np.asarray(timestamps, np.float32),
                           num_events(t), key)
    return _packed_row(tokenizer, timestamps, per_frame, clusters, question, placeholder_ids)


def _packed_row(tokenizer: Any, timestamps, per_frame: int, clusters: KMeansResult, question: str,
                placeholder_ids) -> ScoringRow:
    """The events' prompts and the question packed as one sequence, each slot naming the visual token it takes."""
    ids, mask, events, order = event_batch(tokenizer, timestamps, per_frame, clusters, question)
    packed, positions, segments = pack_segments(ids, mask)
    slots = np.isin(packed, np.asarray(placeholder_ids))
    tokens = (order[:, None] * per_frame + np.arange(per_frame)).reshape(-1)  # slot k takes the k-th of these
    slot_source = np.full(len(packed), -1, np.int32)
    # a placeholder id in the question text too: the last feature, as `VideoLlama3.embed` clips its order
    slot_source[slots] = tokens[np.minimum(np.arange(int(slots.sum())), len(tokens) - 1)]
    return ScoringRow(packed, positions, segments, slot_source, clusters, events)


def synthetic_row(frames: int, tokens_per_frame: int, tokenizer: Any, placeholder_ids) -> ScoringRow:
    """The scoring sequence of a stream of `frames` frames (1 fps) cut into its `num_events` events of equal size,
    with a question of the most tokens scoring takes: compile-check's largest scoring row."""
    from cogstream_jax.inference.events import QUESTION_MAX_TOKENS

    k = num_events(frames)
    assignments = np.minimum(np.arange(frames) * k // frames, k - 1)
    clusters = KMeansResult(np.zeros((k, 1), np.float32), np.zeros(k), assignments, 0, np.full((k, 2), -1))
    return _packed_row(tokenizer, [float(t) for t in range(frames)], tokens_per_frame, clusters,
                       " ".join(["why"] * QUESTION_MAX_TOKENS), placeholder_ids)


def scoring_arrays(rows: dict[int, ScoringRow], total_rows: int, length: int) -> dict[str, np.ndarray]:
    """Host arrays [total_rows, length] of `SCORING_KEYS` with the given rows filled (others empty)."""
    out = {k: np.zeros((total_rows, length), np.int32) for k in SCORING_KEYS}
    out["slot_source"][:] = -1
    for r, row in rows.items():
        n = row.length
        out["ids"][r, :n], out["positions"][r, :n], out["segments"][r, :n] = row.ids, row.positions, row.segments
        out["valid"][r, :n] = 1
        out["slot_source"][r, :n] = row.slot_source
    return out


def event_scores(row: ScoringRow, pooled: np.ndarray) -> np.ndarray:
    """The row's segment means [>= segments, D] -> each event's cosine to the question [K] (nan: empty event)."""
    pooled = np.asarray(pooled)
    scores = np.full(len(row.clusters.center_times), np.nan)
    scores[row.events] = cosine(pooled[len(row.events)], pooled[:len(row.events)])
    return scores


def minor_frames(row: ScoringRow, pooled: np.ndarray) -> tuple[int, ...]:
    """The row's minor frames: those of events with cosine to the question < 0.45, but the representatives."""
    return minor_frames_from_scores(row.clusters.assignments, row.clusters.representatives, event_scores(row, pooled))


def _score_row(graphdef, state, row, projected, num_segments: int, rows_mapped: bool):
    model = nnx.merge(graphdef, state)
    embeds = embed_with_slots(model, row["ids"][None], row["slot_source"][None], projected)
    hidden, _ = model.text_hidden(embeds, row["positions"][None], row["valid"][None],
                                  segment_ids=row["segments"][None], rows_mapped=rows_mapped)
    return segment_means(hidden[0], row["valid"], row["segments"], num_segments)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def score_rows(graphdef, state, arrays: dict[str, jax.Array], projected: jax.Array, num_segments: int,
               rows: NamedSharding, rows_mapped: bool):
    """[R, num_segments, D] segment means of each row's packed scoring sequence, rows over data x fsdp (`rows`:
    that sharding; the output is pinned to it, so each row's means are whole on the row's devices. `rows_mapped`:
    the model's attention is bound to the mesh, see `qwen2.Qwen2Model`)."""
    def one(row, feats):
        return jax.lax.stop_gradient(_score_row(graphdef, state, row, feats, num_segments, rows_mapped))

    return jax.lax.with_sharding_constraint(jax.vmap(one, spmd_axis_name=BATCH_AXES)(arrays, projected), rows)
