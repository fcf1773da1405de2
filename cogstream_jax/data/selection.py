"""Selection strings `[yes|no,i,j,...]` of Historic Dialogue Retrieval (protocol 4 and 6.4).

Parsing follows the official rules exactly, odd strings included, because the rewrite and the saved
`predicted_coi` depend on them:
- generated text is stripped; empty becomes "[yes]"; a missing "]" or "[" is added (select_qas);
- all leading/trailing "[" and "]" are stripped, the rest split on ",";
- a first item "no" sets visual=False, "yes" keeps visual=True; both are dropped; anything else
  (e.g. "maybe") keeps visual=True and is read as an index;
- items that Python's int() rejects are skipped;
- indices >= len(history) are dropped when resolving against the history.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from cogstream_jax.data.prompts import format_selection

# The 16 strings whose token ids the constrained decoder may emit (official StructuredLogitsProcessor).
ALLOWED_STRINGS = tuple(str(i) for i in range(10)) + ("[", "]", ",", "<|im_end|>", "no", "yes")
# Their ids with the VideoLLaMA3 / Qwen2 tokenizer (protocol 4), checked against the real tokenizer in tests.
ALLOWED_TOKEN_IDS = (11, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 58, 60, 2152, 9693, 151645)


@dataclass(frozen=True)
class Selection:
    """A parsed selection: whether visual input is needed and the raw indices in string order."""

    if_visual: bool
    indices: tuple[int, ...]

    def resolve(self, history_length: int) -> tuple[int, ...]:
        """History positions actually selected, in string order (duplicates kept, as the official lists are).

        The official code keeps `i` when `i < len(history)` and indexes a Python list, so a negative index
        within range counts from the end. An index below -len(history) crashes the official code with an
        IndexError; we drop it instead (unreachable with the constrained decoder, which cannot emit '-').
        """
        n = int(history_length)
        return tuple(i % n for i in self.indices if -n <= i < n)

    def relevance(self, history_length: int) -> list[int]:
        """`predicted_coi` as answer_generate saves it: 1 at every position in range(n) that is in `indices`."""
        chosen = set(self.indices)
        return [1 if i in chosen else 0 for i in range(int(history_length))]

    def format(self) -> str:
        return format_selection(self.if_visual, self.indices)


def postprocess_generated(text: str) -> str:
    """Clean the decoded HDR output like select_qas: strip, empty -> "[yes]", add missing brackets."""
    out = text.strip()
    if out == "":
        out = "[yes]"
    if not out.endswith("]"):
        out += "]"
    if not out.startswith("["):
        out = "[" + out
    return out


def parse_selection(text: str) -> Selection:
    """Parse a selection string with the official prepare_inputs / get_selection_output rules."""
    parts = text.strip("[]").split(",")
    if_visual = True
    if parts and parts[0]:
        head = parts[0].strip()
        if head == "no":
            if_visual = False
            parts = parts[1:]
        elif head == "yes":
            parts = parts[1:]
    indices: list[int] = []
    for part in parts:
        item = part.strip()
        if not item:
            continue
        try:
            indices.append(int(item))
        except ValueError:
            continue
    return Selection(if_visual=if_visual, indices=tuple(indices))


def gt_selection(if_visual: bool, coi: Sequence[int]) -> Selection:
    """The oracle selection used by stage-2 training and the `gt` mode: `[yes|no,*COI]` (COI order kept)."""
    return parse_selection(format_selection(if_visual, [int(i) for i in coi]))


def allowed_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """Sorted ids of the allowed strings, encoded without special tokens (official _get_allowed_token_ids)."""
    ids: set[int] = set()
    for text in ALLOWED_STRINGS:
        ids.update(i for i in tokenizer.encode(text, add_special_tokens=False) if i >= 0)
    return tuple(sorted(ids))
