"""Model-ready stage-2 inputs from a `Stage2Sample` (official second_stage_training + forward_train, protocol 5).

Per QA: the Processor renders the whole conversation so far (re-decoding every clip); the ground-truth
selection `[yes|no,*COI]` rewrites it (the first QA too, as forward_train does); the answer `A + <|im_end|>`
is appended and the joint text is tokenised once; labels are -100 on the prompt and the answer tokens
otherwise. The official code asserts that tokenisation is additive (prompt ids + answer ids); when it is
not, or when the text exceeds the tokenizer's `model_max_length` (the official `truncation=True` would cut
the answer and fail that assert), the official loop prints the error and back-propagates a stale loss. We
raise `InputError` instead, so a trainer can skip the QA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cogstream_jax.data.stage2_samples import Stage2Sample
from cogstream_jax.data.rewrite import RewriteResult, rewrite, turns_from_processor_output
from cogstream_jax.data.selection import gt_selection
from cogstream_jax.data.stage1 import IGNORE_INDEX
from cogstream_jax.errors import InputError


@dataclass(frozen=True)
class Stage2Inputs:
    """One training step. `kept_frames` index the processor's frames (all of them when `if_visual`, none
    otherwise); `processor_output` carries pixel_values / grids / timestamps for the vision side."""

    input_ids: np.ndarray  # int32 [L]
    labels: np.ndarray  # int32 [L]
    prompt_length: int
    if_visual: bool
    kept_frames: tuple[int, ...]
    current_question: str
    rewrite: RewriteResult
    processor_output: Any


def stage2_inputs(sample: Stage2Sample, processor: Any, *, max_length: int | None = None) -> Stage2Inputs:
    """Run the processor, the GT rewrite and the answer tokenisation for one stage-2 sample."""
    conversation = list(sample.conversation)
    output = processor(conversation=conversation, add_system_prompt=True, add_generation_prompt=True)
    turns = turns_from_processor_output(conversation, output)
    # forward_train rewrites every QA, the first one included (unlike inference, which skips it).
    rewritten = rewrite(turns, gt_selection(sample.is_visual, sample.coi))
    tokenizer = processor.tokenizer
    prompt_ids = rewritten.token_ids(tokenizer)
    answer_ids = list(tokenizer(sample.target, add_special_tokens=False)["input_ids"])
    joint_ids = list(tokenizer(rewritten.text + sample.target, add_special_tokens=False)["input_ids"])
    where = f"QA_Dataset/{sample.video}.json: [{sample.chain_index}][{sample.qa_index}].A"
    if joint_ids != prompt_ids + answer_ids:
        raise InputError(f"{where}: prompt + answer does not tokenise additively (the official assert fails)")
    limit = max_length if max_length is not None else int(getattr(tokenizer, "model_max_length", 1 << 62))
    if len(joint_ids) > limit:
        raise InputError(f"{where}: {len(joint_ids)} tokens exceed the limit of {limit}")
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return Stage2Inputs(
        input_ids=np.asarray(joint_ids, np.int32),
        labels=np.asarray(labels, np.int32),
        prompt_length=len(prompt_ids),
        if_visual=rewritten.if_visual,
        kept_frames=rewritten.kept_frames,
        current_question=sample.question,
        rewrite=rewritten,
        processor_output=output,
    )
