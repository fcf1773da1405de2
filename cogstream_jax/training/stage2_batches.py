"""Stage-2 sample -> model inputs, as the official second_stage_training builds them (protocol 5):

1. the processor renders the growing conversation (GT answers as assistant turns) up to the current question,
   with the generation prompt;
2. the ground-truth selection `[yes|no,*COI]` rewrites the history (`rewrite_for_mode(..., "gt")`; the first QA
   is never filtered; `no` removes every visual token);
3. answer = GT answer + `<|im_end|>`, tokenised separately and appended; labels only on the answer;
4. the visual stream is compressed: DiffFP always; question-aware event scoring on top when the streaming
   module (`cogstream_jax.inference.events`) is available and `event_compression` is on. Dropped tokens leave
   both the features and the `<image>` placeholders.
Lengths are right-padded to a multiple of `length_multiple` (fewer retraces; by default the attention block,
`attention.BLOCK`, so the fused kernels need no further padding), the supervised positions fixed.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any, Callable, Sequence

import numpy as np

from cogstream_jax.data.difffp import difffp_mask, drop_masked_placeholders
from cogstream_jax.data.stage2_samples import Stage2Sample
from cogstream_jax.data.rewrite import rewrite_for_mode, turns_from_processor_output
from cogstream_jax.data.tokens import IMAGE_TOKEN_ID, PAD_ID
from cogstream_jax.errors import InputError
from cogstream_jax.model.attention import BLOCK
from cogstream_jax.model.vision import VisualLayout
from cogstream_jax.training.losses import IGNORE_INDEX, supervised_positions


def event_compression_available() -> bool:
    """Whether the streaming helper's question-aware event compression module exists in this checkout."""
    return importlib.util.find_spec("cogstream_jax.inference.events") is not None


@dataclasses.dataclass(frozen=True)
class Stage2Batch:
    """Arrays for `make_qa_grad` plus its static arguments."""

    arrays: dict[str, np.ndarray]
    layout: VisualLayout | None
    num_kept: int | None
    answer_tokens: int
    prompt_tokens: int


#: (processor output, current question) -> minor frames (global indices); runs the model outside the gradient
MinorFramesFn = Callable[[Any, str], Sequence[int]]


def render_teacher_forced(sample: Stage2Sample, processor: Any):
    """Render the conversation, rewrite it with the ground-truth selection and append the answer:
    (processor output, rewrite result, prompt ids, answer ids, ids, labels)."""
    conversation = list(sample.conversation)
    out = processor(conversation=conversation)
    turns = turns_from_processor_output(conversation, out)
    result = rewrite_for_mode(turns, "gt", gt_coi=sample.coi, gt_visual=sample.is_visual)
    tokenizer = processor.tokenizer
    prompt = result.token_ids(tokenizer)
    answer = list(tokenizer(sample.target, add_special_tokens=False)["input_ids"])
    ids = np.asarray(prompt + answer, np.int64)
    labels = np.asarray([IGNORE_INDEX] * len(prompt) + answer, np.int64)
    return out, result, prompt, answer, ids, labels


def build_stage2_batch(sample: Stage2Sample, processor: Any, *, length_multiple: int = BLOCK,
                       answer_positions: int | None = None, minor_frames_fn: MinorFramesFn | None = None
                       ) -> Stage2Batch:
    """One QA's teacher-forced inputs (DiffFP, plus event compression when `minor_frames_fn` is given)."""
    out, result, prompt, answer, ids, labels = render_teacher_forced(sample, processor)
    pixels = mask = layout = None
    minor: tuple[int, ...] = ()
    if result.kept_frames:
        if len(result.kept_frames) != out.num_frames:
            raise InputError(f"{sample.video}: the rewrite kept {len(result.kept_frames)} of {out.num_frames} frames; "
                             "stage 2 expects all clips or none (protocol 6.4)")
        minor = tuple(minor_frames_fn(out, sample.question)) if minor_frames_fn is not None else ()
        mask = difffp_mask(out.pixel_values, out.grid_sizes, out.merge_sizes, modals=out.modals,
                           minor_frame_indices=minor)
        keep_ids = np.ones(ids.shape, bool)
        keep_ids[ids == IMAGE_TOKEN_ID] = mask
        ids, labels = ids[keep_ids], labels[keep_ids]
        assert (drop_masked_placeholders(np.asarray(prompt + answer), mask) == ids).all()
        layout = VisualLayout.from_arrays(out.grid_sizes, out.merge_sizes)
        pixels = out.pixel_values
    return assemble(ids, labels, pixels, layout, mask, minor, answer_tokens=len(answer), prompt_tokens=len(prompt),
                    length_multiple=length_multiple, answer_positions=answer_positions)


def assemble(ids: np.ndarray, labels: np.ndarray, pixel_values: np.ndarray | None, layout: VisualLayout | None,
             mask: np.ndarray | None, minor: Sequence[int], *, answer_tokens: int, prompt_tokens: int,
             length_multiple: int = 64, answer_positions: int | None = None) -> Stage2Batch:
    """Token ids/labels after DiffFP (+ the visual inputs) -> the padded arrays of one QA."""
    arrays: dict[str, np.ndarray] = {}
    num_kept = None
    if layout is not None:
        num_frames = sum(t for t, _, _ in layout.grids)
        if minor:
            arrays["minor_frame_mask"] = np.isin(np.arange(num_frames), minor)
        num_kept = int(mask.sum())
        arrays["pixel_values"] = np.asarray(pixel_values, np.float32)
        arrays["compression_mask"] = mask
    length = -(-len(ids) // length_multiple) * length_multiple
    pad = length - len(ids)
    input_ids = np.pad(ids, (0, pad), constant_values=PAD_ID).astype(np.int32)[None]
    labels = np.pad(labels, (0, pad), constant_values=IGNORE_INDEX)[None]
    attention = (np.arange(length) < len(ids)).astype(np.int32)[None]
    positions, targets, weights = supervised_positions(labels, answer_positions)
    arrays.update(input_ids=input_ids, attention_mask=attention, logits_positions=positions, targets=targets,
                  weights=weights)
    return Stage2Batch(arrays, layout, num_kept, answer_tokens, prompt_tokens)


def synthetic_batch(layout: VisualLayout, tokens: int, kept: int, answer_tokens: int, *, patch_dim: int,
                    minor_frames: Sequence[int] = (), length_multiple: int = 64,
                    answer_positions: int | None = None) -> Stage2Batch:
    """A QA of the given size (zeros, first `kept` visual tokens kept) built by the same `assemble` as real
    batches: what compile-check lowers for the largest stage-2 shape."""
    if not 0 < kept <= layout.num_tokens:
        raise InputError(f"kept visual tokens {kept} must be in 1..{layout.num_tokens} (the layout's tokens)")
    if tokens < kept + answer_tokens:
        raise InputError(f"{tokens} tokens cannot hold {kept} visual and {answer_tokens} answer tokens")
    mask = np.arange(layout.num_tokens) < kept
    ids = np.zeros(tokens, np.int64)
    ids[:kept] = IMAGE_TOKEN_ID
    labels = np.full(tokens, IGNORE_INDEX, np.int64)
    labels[tokens - answer_tokens:] = 0
    pixels = np.zeros((layout.num_patches, patch_dim), np.float32)
    return assemble(ids, labels, pixels, layout, mask, minor_frames, answer_tokens=answer_tokens,
                    prompt_tokens=tokens - answer_tokens, length_multiple=length_multiple,
                    answer_positions=answer_positions)
