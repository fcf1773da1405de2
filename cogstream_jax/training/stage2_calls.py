"""One stage-2 device call, prepared by the processes that hold its rows.

A call has R rows split over data x fsdp; a process prepares (decodes, rewrites, DiffFPs, scores) only the QAs of
the rows its devices hold (`Stage2Device.own_rows`), never the others'. What all processes must agree on (the
frames per row and patches bucket of the vision pass, the scoring bucket, the token / input / answer bucket of the
gradient) is settled by one small all-gather each (`multihost.agree_max`), and every device program is called by
every process in the same order with the same shapes: the vision chunks, one batched event-scoring call
(`stage2_scoring`) when some row needs it, the gradient. Rows of other processes are empty on this host; the
device arrays are built shard by shard from the rows this process holds.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import jax
import numpy as np

from cogstream_jax.errors import InputError
from cogstream_jax.inference.events import segment_count
from cogstream_jax.model.generate import bucket_length
from cogstream_jax.multihost import agree_max
from cogstream_jax.training import stage2_buckets as sb
from cogstream_jax.training import stage2_frames as sf
from cogstream_jax.training.stage2_scoring import (minor_frames, score_rows, scoring_arrays, scoring_length,
                                                   scoring_row)

_MERGE_FLIP = 1 << 20  # min merge = _MERGE_FLIP - max(_MERGE_FLIP - merge): the all-gather takes maxima only
#: columns of the per-row table all processes agree on after the QAs are final
PRESENT, TOKENS, INPUTS, ANSWERS, DROPPED = range(5)


def pixels_of(qa) -> np.ndarray | None:
    if isinstance(qa, sb.PreparedQA):
        return None if qa.out is None else qa.out.pixel_values
    return qa.pixel_values


def collect(read: Callable[[], Any], count: int) -> tuple[list[Any], Exception | None]:
    """`count` items from `read`, or those read before an error stopped it, and the error: for
    `CallMaker.finals(..., failed=)`, so that one host's bad input stops every host."""
    items: list[Any] = []
    try:
        for _ in range(count):
            items.append(read())
    except StopIteration:  # the stream's end: the same position on every process, not a failure
        raise
    except Exception as e:  # noqa: BLE001 - re-raised by CallMaker.finals once all processes know
        return items, e
    return items, None


class CallMaker:
    """The host side of stage-2 calls of `rows` rows on `device` (a `Stage2Device`): which rows this process
    prepares, and the agreed shapes, vision pass and event scoring of each call."""

    def __init__(self, setup, device, tokenizer: Any, *, rows: int, seed: int):
        if rows % device.dp:
            raise InputError(f"{rows} rows per call do not split over data x fsdp = {device.dp}")
        self.setup, self.device, self.tokenizer, self.rows, self.seed = setup, device, tokenizer, rows, seed
        self.own = device.own_rows(rows)
        self.patch_dim = setup.model().config.vision.patch_dim
        self._view = (None, None, None)  # (state, model view, k-means key) of the last scoring

    def owns(self, index: int) -> bool:
        """Whether this process prepares the `index`-th QA counted from the first row of some device call."""
        return bool(self.own[index % self.rows])

    def finals(self, state, items: Sequence[Any], failed: Exception | None = None
               ) -> tuple[list[sb.FinalQA | None], sf.RowFrames | None, Any, np.ndarray]:
        """A call's items (this process's rows: PreparedQA to score, FinalQA, or OversizedQA; None elsewhere) ->
        (final QAs of this process's rows, the frames, the vision output, [rows] bool: own rows dropped).

        `failed`: the error that stopped this process preparing its rows (`collect`). It (or an error in reading
        what the rows need) is raised here, after the call's first all-gather has told every process, which then
        stop too (naming the process) instead of waiting in a collective the failed process never joins. Errors
        on one process after that point (none expected from valid prepared QAs) are not shared this way."""
        items = list(items) + [None] * (self.rows - len(items))
        if failed is None:
            try:
                needs = [sf.frame_needs(q.layout if isinstance(q, (sb.PreparedQA, sb.FinalQA)) else None)
                         for q in items]
            except Exception as e:  # noqa: BLE001 - raised below, once all processes know
                failed = e
        if failed is not None:  # this process joins the all-gather with nothing but the failure
            items = [None] * self.rows
            needs = [sf.frame_needs(None)] * self.rows
        qas = [q if isinstance(q, (sb.PreparedQA, sb.FinalQA)) else None for q in items]
        dropped = np.asarray([isinstance(q, sb.OversizedQA) for q in items])
        scoring = {r: q for r, q in enumerate(qas) if isinstance(q, sb.PreparedQA)}
        flips = [_MERGE_FLIP - m for _, _, m in needs if m]
        agreed = agree_max(np.asarray([max(f for f, _, _ in needs), max(p for _, p, _ in needs),
                                       max(m for _, _, m in needs), max(flips + [0]), len(scoring),
                                       max([q.layout.num_tokens for q in scoring.values()] + [0]),
                                       0 if failed is None else jax.process_index() + 1]))
        if failed is not None:
            raise failed
        if agreed[6]:
            raise InputError(f"stage 2: process {int(agreed[6]) - 1} could not prepare its QAs of this call (its "
                             "own error names the input); stopping with it")
        frames = self._frames(qas, *(int(x) for x in agreed[:4]))
        flat = self.device.vision(frames)
        minor = self._score(state, scoring, frames, flat, int(agreed[5])) if agreed[4] else {}
        finals: list[sb.FinalQA | None] = []
        for r, q in enumerate(qas):
            if isinstance(q, sb.PreparedQA):
                try:
                    q = sb.finalize_qa(q, minor.get(r, ()))
                except sb.OversizedQA as e:
                    print(f"warning: dropped stage-2 QA: {e}", file=sys.stderr)
                    q, dropped[r] = None, True
            finals.append(q)
        return finals, frames, flat, dropped

    def table(self, finals: Sequence[sb.FinalQA | None], dropped: np.ndarray, extra: np.ndarray | None = None
              ) -> np.ndarray:
        """[rows, 5] int64 (PRESENT, TOKENS, INPUTS, ANSWERS, DROPPED) of every row, then the `extra` column if
        given (this process's rows filled), agreed by all processes in one all-gather."""
        local = np.zeros((self.rows, 5 if extra is None else 6), np.int64)
        for r, q in enumerate(finals):
            if q is not None:
                local[r, :DROPPED] = (1, q.num_tokens, q.num_inputs, q.answer_tokens)
        local[:, DROPPED] = dropped
        if extra is not None:
            local[:, DROPPED + 1] = extra
        return agree_max(local)

    def pack(self, finals: Sequence[sb.FinalQA | None], frames: sf.RowFrames | None, flat, table: np.ndarray,
             indices: Sequence[int], *, row_weight: float, token_buckets: Sequence[int], answers: int = 0):
        """-> (Stage2Call, device arrays, visual inputs) in the bucket of the call's largest row (any process), with
        at least `answers` supervised positions."""
        call = sb.pack_call(finals, indices, frames.token_rows if frames else [None] * self.rows,
                            row_weight=row_weight, min_tokens=int(table[:, TOKENS].max()),
                            min_inputs=int(table[:, INPUTS].max()),
                            min_answers=max(int(table[:, ANSWERS].max()), answers), token_buckets=token_buckets)
        arrays = {k: self.device.put(v) for k, v in call.arrays.items()}
        return call, arrays, self.device.inputs(call, flat)

    def empty_calls(self, sizes: Sequence[int], *, token_buckets: Sequence[int], answers: int) -> list[sb.Stage2Call]:
        """Calls of empty rows in the buckets of `sizes` tokens (the shapes `Stage2Device.precompile` takes)."""
        return [sb.pack_call([None] * self.rows, range(self.rows), [None] * self.rows, row_weight=0.0,
                             min_tokens=n, min_answers=answers, token_buckets=token_buckets) for n in sizes]

    # -------------------------------------------------------------------------------------------------- internals
    def _frames(self, qas, frames: int, patches: int, merge: int, flip: int) -> sf.RowFrames | None:
        """This process's rows' frames in the call's agreed shape (None: no row of any process has frames)."""
        if not frames:
            return None
        if _MERGE_FLIP - flip != merge:
            raise InputError(f"mixed merge sizes {sorted({_MERGE_FLIP - flip, merge})} in one stage-2 call")
        return sf.pack_row_frames([None if q is None else q.layout for q in qas],
                                  [None if q is None else pixels_of(q) for q in qas],
                                  rows_per_device=self.rows // self.device.dp, frames_per_row=frames,
                                  patches=sf.patches_bucket(patches, merge), merge=merge, patch_dim=self.patch_dim)

    def _model(self, state):
        if self._view[0] is not state:
            key = jax.random.fold_in(jax.random.key(self.seed), int(jax.device_get(state.step)))
            self._view = (state, self.setup.model(state), key)
        return self._view[1], self._view[2]

    def _score(self, state, scoring: dict[int, sb.PreparedQA], frames: sf.RowFrames, flat, visual: int
               ) -> dict[int, tuple[int, ...]]:
        """Minor frames of the rows in `scoring` (this process's), the current adapter scoring every call's rows
        in one program."""
        from flax import nnx

        model, key = self._model(state)
        index = np.zeros((self.rows, bucket_length(visual)), np.int32)
        for r, q in scoring.items():
            index[r, :q.layout.num_tokens] = frames.token_rows[r]
        projected = self.device.project_rows(model.mm_projector, flat, index)
        local = self.device.local_rows(projected)
        home = jax.local_devices()[0]  # k-means on one device: its programs compile once, not once per device
        rows = {r: scoring_row(jax.device_put(local[r][:q.layout.num_tokens], home), q.out.timestamps, q.question,
                               self.tokenizer, key, model.config.placeholder_ids) for r, q in scoring.items()}
        sizes = agree_max(np.asarray([max([s.length for s in rows.values()] + [1]),
                                      max([s.num_segments for s in rows.values()] + [1])]))
        arrays = scoring_arrays(rows, self.rows, scoring_length(int(sizes[0])))
        graphdef, view_state = nnx.split(model)
        pooled = score_rows(graphdef, view_state, {k: self.device.put(v) for k, v in arrays.items()}, projected,
                            segment_count(int(sizes[1])), self.device.rows,
                            model.attn_mesh is not None)
        means = self.device.local_rows(pooled)
        return {r: minor_frames(s, np.asarray(means[r])) for r, s in rows.items()}
