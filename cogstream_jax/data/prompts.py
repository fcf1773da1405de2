"""CogStream prompt strings, built from the official rendered examples shipped as package data.

The retrieval (Historic Dialogue Retrieval) and event-summary prompts must be byte-identical to the official
ones: the published LoRA adapters were trained on exactly those strings. So we never retype them. The fixed
parts are cut out of the rendered example files in `assets/cogstream_prompts/` (MIT, see LICENSE there) using
the example's known inputs; only the per-pair line format `"\\n{i}. Q: {q}\\n   A: {a}"`, the frame format
`"Time {t:.1f}s:" + P*"<image>"` and the target format live in code. `tests/test_prompts.py` proves that the
port re-renders every shipped example byte for byte.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Sequence

from cogstream_jax.errors import DataError

PROMPTS_PACKAGE_DIR = "assets/cogstream_prompts"
RETRIEVAL_EXAMPLE = "retrieval_rendered_example.txt"
RETRIEVAL_NO_DEMO = "retrieval_rendered_no_demo.txt"
RETRIEVAL_INPUTS = "retrieval_rendered_example.inputs.json"
EVENT_SUMMARY_EXAMPLE = "event_summary_rendered_example.txt"
# The event-summary example renders 2 frames at 12.0 s and 13.0 s with 3 visual tokens each (README there).
EVENT_SUMMARY_EXAMPLE_TIMESTAMPS = (12.0, 13.0)
EVENT_SUMMARY_EXAMPLE_TOKENS = 3
JUDGE_METRICS = ("IA", "DC", "CA", "TP", "LC")
IMAGE_TOKEN = "<image>"
RETRIEVAL_EOS = "<|im_end|>"


def read_prompt_file(name: str) -> str:
    """Text of one shipped prompt file, exactly as stored (UTF-8, no newline translation)."""
    path = resources.files("cogstream_jax").joinpath(f"{PROMPTS_PACKAGE_DIR}/{name}")
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"cogstream_jax/{PROMPTS_PACKAGE_DIR}/{name}: prompt file missing from the package") from None


def format_history_pairs(history: Sequence[tuple[str, str]]) -> str:
    """The numbered history block: one `"\\n{i}. Q: {q}\\n   A: {a}"` per pair (official format_example)."""
    return "".join(f"\n{i}. Q: {q}\n   A: {a}" for i, (q, a) in enumerate(history))


@dataclass(frozen=True)
class RetrievalTemplate:
    """Fixed parts of the retrieval prompt, in order: head, [demos], before_question, Q, after_question, pairs, tail."""

    head: str
    demos: str
    before_question: str
    after_question: str
    tail: str

    def render(self, current_question: str, history: Sequence[tuple[str, str]], with_demos: bool = True) -> str:
        return "".join(
            (
                self.head,
                self.demos if with_demos else "",
                self.before_question,
                current_question,
                self.after_question,
                format_history_pairs(history),
                self.tail,
            )
        )


def _split_once(text: str, marker: str, where: str) -> tuple[str, str]:
    if text.count(marker) != 1:
        raise DataError(f"{where}: expected exactly one occurrence of {marker[:60]!r}, found {text.count(marker)}")
    before, after = text.split(marker)
    return before, after


@lru_cache(maxsize=1)
def retrieval_template() -> RetrievalTemplate:
    """Cut the fixed parts out of the two shipped renderings of the same inputs (with and without demos)."""
    inputs = json.loads(read_prompt_file(RETRIEVAL_INPUTS))
    question = inputs["current_Q"]
    pairs = format_history_pairs(list(zip(inputs["hist_Qs"], inputs["hist_As"])))
    plain = read_prompt_file(RETRIEVAL_NO_DEMO)
    with_demo = read_prompt_file(RETRIEVAL_EXAMPLE)
    where = f"cogstream_jax/{PROMPTS_PACKAGE_DIR}/{RETRIEVAL_NO_DEMO}"
    before_pairs, tail = _split_once(plain, pairs, where)
    question_marker = f"Current Question: {question}"
    before_marker, after_question = _split_once(before_pairs, question_marker, where)
    before_question_label = "Current Question: "
    # The demos are one block inserted inside the user turn before "Current Question": the extra text that
    # starts where the two renderings first differ.
    insert_at = min(len(os.path.commonprefix([plain, with_demo])), len(before_marker))
    demos = with_demo[insert_at : insert_at + len(with_demo) - len(plain)]
    if with_demo != plain[:insert_at] + demos + plain[insert_at:]:
        raise DataError(f"cogstream_jax/{PROMPTS_PACKAGE_DIR}/{RETRIEVAL_EXAMPLE}: demos are not one inserted block")
    return RetrievalTemplate(
        head=plain[:insert_at],
        demos=demos,
        before_question=before_marker[insert_at:] + before_question_label,
        after_question=after_question,
        tail=tail,
    )


def retrieval_prompt(current_question: str, history: Sequence[tuple[str, str]], with_demos: bool = True) -> str:
    """The Historic Dialogue Retrieval prompt (stage 1 training and inference), ending with the assistant header."""
    return retrieval_template().render(current_question, history, with_demos)


def format_selection(if_visual: bool, indices: Sequence[int]) -> str:
    """`[yes|no,i,j,...]` with the indices in the order given (the official builders join them as given)."""
    return "[" + ",".join(["yes" if if_visual else "no", *(str(int(i)) for i in indices)]) + "]"


def retrieval_target(if_visual: bool, indices: Sequence[int]) -> str:
    """Stage-1 target: the selection string plus `<|im_end|>`, e.g. "[yes,0,5]<|im_end|>"."""
    return format_selection(if_visual, indices) + RETRIEVAL_EOS


def format_event_frames(timestamps: Sequence[float], tokens_per_frame: int) -> str:
    """`Time {t:.1f}s:` + P `<image>` per frame, comma-joined (official create_visual_summary_prompt)."""
    return ",".join(f"Time {float(t):.1f}s:{IMAGE_TOKEN * int(tokens_per_frame)}" for t in timestamps)


@dataclass(frozen=True)
class EventSummaryTemplate:
    head: str
    tail: str


@lru_cache(maxsize=1)
def event_summary_template() -> EventSummaryTemplate:
    text = read_prompt_file(EVENT_SUMMARY_EXAMPLE)
    frames = format_event_frames(EVENT_SUMMARY_EXAMPLE_TIMESTAMPS, EVENT_SUMMARY_EXAMPLE_TOKENS)
    head, tail = _split_once(text, frames, f"cogstream_jax/{PROMPTS_PACKAGE_DIR}/{EVENT_SUMMARY_EXAMPLE}")
    return EventSummaryTemplate(head=head, tail=tail)


def event_summary_prompt(timestamps: Sequence[float], tokens_per_frame: int) -> str:
    """Event-summary prompt for one cluster's frames (question-aware event scoring, spec 6.2); no trailing newline."""
    template = event_summary_template()
    return template.head + format_event_frames(timestamps, tokens_per_frame) + template.tail


def judge_rubric(metric: str) -> str:
    """System-side rubric of an LLM-judge metric (IA, DC, CA, TP or LC), verbatim with its indentation."""
    key = metric.strip().upper()
    if key not in JUDGE_METRICS:
        raise DataError(f"metric: unknown judge metric {metric!r}; expected one of {', '.join(JUDGE_METRICS)}")
    return read_prompt_file(f"judge_{JUDGE_METRICS.index(key) + 1}_{key}_rubric.txt")
