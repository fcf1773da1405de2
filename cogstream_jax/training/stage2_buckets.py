"""Bounded stage-2 shapes: QAs padded into a small, fixed set of buckets, several QAs per device call.

A stage-2 QA is a growing conversation: its token count, frame count, patches per frame (the processor resizes
frames as the stream grows) and kept visual tokens all vary. Jitting on the exact shapes (or a static
`VisualLayout`) compiles one program per QA; here every size is rounded up to a bucket of a fixed ladder:

- tokens per QA (`L`, gradient program): `TOKEN_BUCKETS` = 256, 512, 768, 1024, 1536, 2048, 3072, 4096, ...
  32768 (multiples of `attention.BLOCK`, so splash takes them; steps of 1.5x above 1024; short text-only QAs
  share the 256 bucket rather than adding programs), or buckets chosen from the data (`choose_token_buckets`:
  the fewest-padding `count` sizes for the QA lengths of a scan, then the fixed ladder above them);
- visual inputs per QA (`U`, gradient program): `2 L` (`INPUTS_PER_TOKEN`), so that a QA whose event compression
  pools more frame tokens than it keeps shares its length's program; the token ladder above `2 L` only when even
  that is too few. The extra rows only pass the projector (about 0.2% of a 7B model's per-token work);
- supervised positions (`A`, gradient program): `ANSWER_BUCKETS` = 64, 256, 1024, 4096;
- patches per frame (`P`, vision program): `PATCH_BUCKETS` = 16, 24, 36, 56, 84, 128, 192, 288, 432, 648, 972,
  1460, 2188, 3284, 4096 (about 1.5x apart, multiples of merge^2 = 4);
- frames per vision call: `stage2_frames.FRAMES_PER_DEVICE` per device (each device's rows' frames, cut into
  such chunks, the last one padded with invalid frames; `stage2_frames`).

So the gradient program is keyed by (L, U, A) only and the vision program by P only; nothing depends on the
visual layout (grids, merge order, which tokens DiffFP kept): that travels as index arrays. Padding changes
nothing (masks: attention mask over padded tokens, weight 0 on padded answer positions, padded visual inputs
never referenced, padded patches masked out of the per-frame attention, padded rows weighted 0).

A QA over the largest bucket (more than `TOKEN_BUCKETS[-1]` tokens or `ANSWER_BUCKETS[-1]` answer tokens) is
skipped with a warning naming it (`OversizedQA`); its row stays empty.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from cogstream_jax.data.difffp import difffp_mask
from cogstream_jax.data.stage2_samples import Stage2Sample
from cogstream_jax.data.tokens import IMAGE_TOKEN_ID, PAD_ID
from cogstream_jax.errors import InputError
from cogstream_jax.model.attention import BLOCK, pad_to_block
from cogstream_jax.model.frame_vision import bucket
from cogstream_jax.model.vision import VisualLayout
from cogstream_jax.training.losses import IGNORE_INDEX, supervised_positions
from cogstream_jax.training.stage2_batches import render_teacher_forced
from cogstream_jax.training.stage2_frames import RowFrames, frame_needs, pack_row_frames, patches_bucket

TOKEN_BUCKETS = tuple(pad_to_block(n) for n in (256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288,
                                                16384, 24576, 32768))
ANSWER_BUCKETS = (64, 256, 1024, 4096)
INPUTS_PER_TOKEN = 2  # visual-input rows per token row: room for the frame tokens event compression pools
assert all(b % BLOCK == 0 for b in TOKEN_BUCKETS)


def choose_token_buckets(lengths: Sequence[int], count: int, *, longest: int = 0) -> tuple[int, ...]:
    """At most `count` token buckets (multiples of `BLOCK`, the largest holding the longest QA and `longest`) that
    minimise the padding of `lengths` (each QA in the smallest bucket that holds it): an exact dynamic programme
    over the distinct block-padded lengths, O(count x distinct^2)."""
    if count < 1:
        raise InputError(f"token bucket count must be >= 1, got {count}")
    if not len(lengths):
        return ()
    padded = np.asarray([pad_to_block(max(int(n), 1)) for n in lengths], np.int64)
    top = max(int(padded.max()), pad_to_block(longest))
    sizes, group_of = np.unique(np.append(padded, top), return_inverse=True)
    group_of = group_of[:-1]  # the top size holds no QA of its own unless one is that long
    counts = np.bincount(group_of, minlength=len(sizes)).astype(np.int64)
    sums = np.bincount(group_of, weights=np.asarray(lengths, np.float64), minlength=len(sizes))
    n_before = np.concatenate([[0], np.cumsum(counts)])
    s_before = np.concatenate([[0.0], np.cumsum(sums)])

    def pad(i: int, j: int) -> float:  # groups i..j (inclusive) padded to sizes[j]
        return float(sizes[j] * (n_before[j + 1] - n_before[i]) - (s_before[j + 1] - s_before[i]))

    m = len(sizes)
    best = [pad(0, j) for j in range(m)]  # one bucket covering groups 0..j
    choice = [[j] for j in range(m)]
    for _ in range(1, min(count, m)):
        new_best, new_choice = list(best), [list(c) for c in choice]
        for j in range(m):
            for i in range(j):  # the previous bucket ends at group i
                cost = best[i] + pad(i + 1, j)
                if cost < new_best[j]:
                    new_best[j], new_choice[j] = cost, choice[i] + [j]
        best, choice = new_best, new_choice
    return tuple(int(sizes[j]) for j in choice[m - 1])


def token_ladder(chosen: Sequence[int]) -> tuple[int, ...]:
    """Chosen buckets, then the fixed ladder above them (a later, longer QA still finds a bucket)."""
    chosen = tuple(sorted(int(b) for b in chosen))
    if any(b % BLOCK for b in chosen):
        raise InputError(f"token buckets {list(chosen)} must be multiples of {BLOCK}")
    top = chosen[-1] if chosen else 0
    return chosen + tuple(b for b in TOKEN_BUCKETS if b > top)


class OversizedQA(InputError):
    """A QA larger than the largest bucket."""


def qa_name(sample: Stage2Sample) -> str:
    return f"{sample.video} chain {sample.chain_index} QA {sample.qa_index}"


@dataclasses.dataclass
class PreparedQA:
    """Host-side work of one QA that needs no model: processor output, GT rewrite, token ids (before DiffFP)."""

    name: str
    question: str
    ids: np.ndarray  # prompt + answer (all placeholders)
    labels: np.ndarray
    answer_tokens: int
    prompt_tokens: int
    out: Any | None  # processor output when visual tokens are kept (pixel_values, grid_sizes, ...)
    layout: VisualLayout | None

    @property
    def num_frames(self) -> int:
        return 0 if self.layout is None else sum(t for t, _, _ in self.layout.grids)


@dataclasses.dataclass
class FinalQA:
    """One QA ready to pack: token ids/labels after DiffFP, which visual tokens fill the placeholders, which are
    pooled (event compression), and its frames for the vision pass."""

    name: str
    ids: np.ndarray
    labels: np.ndarray
    answer_tokens: int
    prompt_tokens: int
    layout: VisualLayout | None = None
    pixel_values: np.ndarray | None = None
    visual_sources: np.ndarray | None = None  # [U] the QA's visual token index (original order) of each input
    slot_inputs: np.ndarray | None = None  # [placeholders] which visual input fills each placeholder, in order
    input_groups: np.ndarray | None = None  # [U] the input each one is pooled into (-1: none)

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    @property
    def num_inputs(self) -> int:
        return 0 if self.visual_sources is None else len(self.visual_sources)


def prepare_qa(sample: Stage2Sample, processor: Any) -> PreparedQA:
    """Steps 1-3 of `stage2_batches.build_stage2_batch` (render, GT rewrite, answer)."""
    out, result, prompt, answer, ids, labels = render_teacher_forced(sample, processor)
    name = qa_name(sample)
    if len(answer) > ANSWER_BUCKETS[-1]:
        raise OversizedQA(f"{name}: {len(answer)} answer tokens are over the largest stage-2 bucket "
                          f"({ANSWER_BUCKETS[-1]} answer tokens)")
    layout = None
    if result.kept_frames:
        if len(result.kept_frames) != out.num_frames:
            raise InputError(f"{sample.video}: the rewrite kept {len(result.kept_frames)} of {out.num_frames} frames; "
                             "stage 2 expects all clips or none (protocol 6.4)")
        layout = VisualLayout.from_arrays(out.grid_sizes, out.merge_sizes)
    return PreparedQA(name, sample.question, ids, labels, len(answer), len(prompt), out if layout else None, layout)


def _check_length(qa, tokens: int) -> None:
    if tokens > TOKEN_BUCKETS[-1]:
        raise OversizedQA(f"{qa.name}: {tokens} tokens after DiffFP are over the largest stage-2 bucket "
                          f"({TOKEN_BUCKETS[-1]} tokens)")


def finalize_qa(qa: PreparedQA, minor: Sequence[int] = ()) -> FinalQA:
    """DiffFP (+ the minor frames of event compression) -> the QA's kept tokens and visual inputs; `OversizedQA`
    when the result is over the largest token bucket."""
    if qa.layout is None:
        _check_length(qa, len(qa.ids))
        return FinalQA(qa.name, qa.ids, qa.labels, qa.answer_tokens, qa.prompt_tokens)
    out = qa.out
    mask = difffp_mask(out.pixel_values, out.grid_sizes, out.merge_sizes, modals=out.modals,
                       minor_frame_indices=minor)
    keep_ids = np.ones(qa.ids.shape, bool)
    keep_ids[qa.ids == IMAGE_TOKEN_ID] = mask
    ids, labels = qa.ids[keep_ids], qa.labels[keep_ids]
    _check_length(qa, len(ids))
    kept = np.flatnonzero(mask)
    sources, groups = [kept], [np.full(len(kept), -1, np.int64)]
    if len(minor):
        per_frame = np.repeat(np.arange(qa.num_frames), _tokens_per_frame(qa.layout))
        first = {}
        for i, f in enumerate(per_frame):
            first.setdefault(int(f), i)
        slot_of = {int(t): s for s, t in enumerate(kept)}
        for f in sorted(set(int(x) for x in minor)):
            token0 = first[f]
            if token0 not in slot_of:  # its pooled token 0 is not kept: nothing to pool into
                continue
            frame_tokens = np.flatnonzero(per_frame == f)
            extra = np.asarray([t for t in frame_tokens if t not in slot_of], np.int64)
            groups[0][slot_of[token0]] = slot_of[token0]
            sources.append(extra)
            groups.append(np.full(len(extra), slot_of[token0], np.int64))
    return FinalQA(qa.name, ids, labels, qa.answer_tokens, qa.prompt_tokens, qa.layout,
                   np.asarray(out.pixel_values, np.float32), np.concatenate(sources), np.arange(len(kept)),
                   np.concatenate(groups))


def _tokens_per_frame(layout: VisualLayout) -> list[int]:
    return [(h // m) * (w // m) for (t, h, w), m in zip(layout.grids, layout.merges) for _ in range(t)]


@dataclasses.dataclass
class Stage2Call:
    """Host arrays of one device call: `arrays` (`step.STAGE2_KEYS`, leading row axis) and `sources` [R, U]: each
    row's visual inputs as rows of the flattened vision output (`Frames`)."""

    arrays: dict[str, np.ndarray]
    sources: np.ndarray
    real_tokens: int
    padded_tokens: int
    answer_tokens: int
    bucket: tuple[int, int, int]  # (L, U, A)


def pack_call(qas: Sequence[FinalQA | None], qa_indices: Sequence[int], token_rows: Sequence[np.ndarray | None], *,
              row_weight: float, min_tokens: int = 0, min_inputs: int = 0, min_answers: int = 0,
              token_buckets: Sequence[int] = TOKEN_BUCKETS) -> Stage2Call:
    """QAs (None = an empty row, weight 0) -> one call's arrays in the common bucket of its rows (`token_buckets`:
    the ladder of `L`, ascending), or of the `min_*` sizes if larger (rows prepared by other processes)."""
    real = [q for q in qas if q is not None]
    length = bucket(max([q.num_tokens for q in real] + [min_tokens, 1]), token_buckets)
    inputs = max([q.num_inputs for q in real] + [min_inputs, 1])
    u = INPUTS_PER_TOKEN * length if length is not None and inputs <= INPUTS_PER_TOKEN * length \
        else bucket(inputs, token_buckets)
    answers = bucket(max([q.answer_tokens for q in real] + [min_answers, 1]), ANSWER_BUCKETS)
    if length is None or u is None or answers is None:
        raise OversizedQA(f"{', '.join(q.name for q in real)}: over the largest stage-2 bucket")
    rows = len(qas)
    arrays = {
        "input_ids": np.full((rows, length), PAD_ID, np.int32),
        "attention_mask": np.zeros((rows, length), np.int32),
        "slot_source": np.full((rows, length), -1, np.int32),
        "token_group": np.full((rows, u), -1, np.int32),
        "qa_index": np.asarray(qa_indices, np.int32),
        "row_weight": np.asarray([0.0 if q is None else row_weight for q in qas], np.float32),
    }
    labels = np.full((rows, length), IGNORE_INDEX, np.int64)
    sources = np.zeros((rows, u), np.int32)
    for r, q in enumerate(qas):
        if q is None:
            continue
        n = q.num_tokens
        arrays["input_ids"][r, :n] = q.ids
        arrays["attention_mask"][r, :n] = 1
        labels[r, :n] = q.labels
        if q.layout is None:
            continue
        slots = np.flatnonzero(q.ids == IMAGE_TOKEN_ID)
        if len(slots) != len(q.slot_inputs):
            raise InputError(f"{q.name}: {len(slots)} visual placeholders but {len(q.slot_inputs)} kept tokens")
        arrays["slot_source"][r, slots] = q.slot_inputs
        arrays["token_group"][r, :q.num_inputs] = q.input_groups
        sources[r, :q.num_inputs] = token_rows[r][q.visual_sources]
    positions, targets, weights = supervised_positions(labels, answers)
    arrays.update(logits_positions=positions, targets=targets, weights=weights)
    return Stage2Call(arrays, sources, sum(q.num_tokens for q in real), length * len(real),
                      sum(q.answer_tokens for q in real), (length, u, answers))


def synthetic_qa(layout: VisualLayout, tokens: int, kept: int, answer_tokens: int, *, patch_dim: int,
                 minor_frames: Sequence[int] = ()) -> FinalQA:
    """A QA of the given size (zeros; the first `kept` visual tokens kept, minor frames pooled) in the same form
    as real ones: what compile-check packs for the largest stage-2 shape."""
    if not 0 < kept <= layout.num_tokens:
        raise InputError(f"kept visual tokens {kept} must be in 1..{layout.num_tokens} (the layout's tokens)")
    if tokens < kept + answer_tokens:
        raise InputError(f"{tokens} tokens cannot hold {kept} visual and {answer_tokens} answer tokens")
    ids = np.zeros(tokens, np.int64)
    ids[:kept] = IMAGE_TOKEN_ID
    labels = np.full(tokens, IGNORE_INDEX, np.int64)
    labels[tokens - answer_tokens:] = 0
    sources, groups = [np.arange(kept)], [np.full(kept, -1, np.int64)]
    per_frame = _tokens_per_frame(layout)
    starts = np.concatenate([[0], np.cumsum(per_frame)[:-1]])
    for f in minor_frames:
        token0 = int(starts[f])
        if token0 >= kept:
            continue
        extra = np.arange(max(token0 + 1, kept), token0 + per_frame[f])
        groups[0][token0] = token0
        sources.append(extra)
        groups.append(np.full(len(extra), token0, np.int64))
    pixels = np.zeros((layout.num_patches, patch_dim), np.float32)
    return FinalQA("synthetic", ids, labels, answer_tokens, tokens - answer_tokens, layout, pixels,
                   np.concatenate(sources), np.arange(kept), np.concatenate(groups))


def synthetic_call(qa: FinalQA, rows: int, *, dp: int) -> tuple[Stage2Call, RowFrames]:
    """`rows` copies of `qa` packed as one call of `rows` rows over `dp` devices (vision frames, gradient arrays)."""
    frames_per_row, patches, merge = frame_needs(qa.layout)
    frames = pack_row_frames([qa.layout] * rows, [qa.pixel_values] * rows, rows_per_device=rows // dp,
                                frames_per_row=frames_per_row, patches=patches_bucket(patches, merge),
                                merge=merge, patch_dim=qa.pixel_values.shape[-1])
    call = pack_call([qa] * rows, list(range(rows)), frames.token_rows, row_weight=1.0 / rows)
    return call, frames
