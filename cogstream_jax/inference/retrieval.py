"""Historic Dialogue Retrieval at inference (protocol 6.4, official `select_qas` / `qa_selection`).

The retrieval prompt (shared prompt data, with demos) is decoded greedily under the retrieval adapter
(`language_module`), every step restricted to the 16 allowed ids, at most 50 new tokens, EOS `<|im_end|>`.
Like the official `generate(do_sample=False, ...)` call, the model's generation_config repetition penalty (1.05)
still applies, over the prompt and the generated ids. The text is decoded with special tokens skipped,
post-processed (empty -> "[yes]", brackets added) and parsed with the official rules. Modes: FCC (predicted),
AC (everything), NC (no history QA, "[yes]"), gt (oracle `[yes|no,*COI]`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import jax
import numpy as np

from cogstream_jax.data.prompts import format_selection, retrieval_prompt
from cogstream_jax.data.selection import ALLOWED_TOKEN_IDS, parse_selection, postprocess_generated
from cogstream_jax.errors import InputError
from cogstream_jax.inference.prefix_cache import PrefixCache, generate_with_prefix
from cogstream_jax.model.sampling import SamplingConfig

MODES = ("FCC", "AC", "NC", "gt")
RETRIEVAL_MAX_NEW_TOKENS = 50
RETRIEVAL_EOS = 151645


@dataclass(frozen=True)
class RetrievalOutput:
    """`selection` is what the official code returns as selection_module_output ('' when nothing ran)."""

    selection: str
    if_visual: bool
    indices: tuple[int, ...]  # parsed indices in string order (unfiltered, as answer_generate uses them)
    raw_text: str = ""

    def predicted_coi(self, history_length: int) -> list[int]:
        """The saved 0/1 list: 1 where a history position appears among the indices."""
        chosen = set(self.indices)
        return [1 if i in chosen else 0 for i in range(history_length)]


NOTHING = RetrievalOutput("", True, ())


def from_selection(selection: str, raw_text: str = "") -> RetrievalOutput:
    parsed = parse_selection(selection)
    return RetrievalOutput(selection, parsed.if_visual, parsed.indices, raw_text)


def decode_generated(tokenizer: Any, ids: Sequence[int], eos: int = RETRIEVAL_EOS) -> str:
    """Decode up to and including the first EOS, special tokens skipped, stripped."""
    ids = list(int(i) for i in ids)
    if eos in ids:
        ids = ids[: ids.index(eos) + 1]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def predict_selection(model, tokenizer: Any, question: str, history_questions: Sequence[str],
                      history_answers: Sequence[str], *, penalty: float = 1.05,
                      max_new_tokens: int = RETRIEVAL_MAX_NEW_TOKENS, with_demos: bool = True,
                      eos_token_id: int = RETRIEVAL_EOS, prefix: PrefixCache | None = None) -> RetrievalOutput:
    """Run the constrained greedy retrieval with the model's ACTIVE adapter (the caller selects it).
    With `prefix` (a cache kept for this adapter), only the part of the prompt that changed is prefilled."""
    prompt = retrieval_prompt(question, list(zip(history_questions, history_answers)), with_demos)
    ids = np.asarray(tokenizer(prompt)["input_ids"], np.int32)[None]
    sampling = SamplingConfig(do_sample=False, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=penalty)
    out = generate_with_prefix(model, prefix, ids, max_new_tokens=max_new_tokens, sampling=sampling,
                               key=jax.random.PRNGKey(0), allowed_token_ids=ALLOWED_TOKEN_IDS,
                               eos_token_ids=(eos_token_id,), pad_token_id=151643)
    raw = decode_generated(tokenizer, out[0], eos_token_id)
    return from_selection(postprocess_generated(raw), raw)


def select_for_mode(mode: str, history_length: int, *, predict=None, gt_coi: Sequence[int] = (),
                    gt_visual: bool = True) -> RetrievalOutput:
    """qa_selection's modes; the first QA (no history) is never filtered. `predict()` runs FCC retrieval."""
    if mode not in MODES:
        raise InputError(f"mode: unknown retrieval mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "AC" or history_length == 0:
        return NOTHING
    if mode == "NC":
        return from_selection("[yes]")
    if mode == "gt":
        return from_selection(format_selection(gt_visual, [int(i) for i in gt_coi]))
    if predict is None:
        raise InputError("predict: FCC mode needs the retrieval model")
    return predict()
