"""CogReasoner history rewrite / interleaving on a STRUCTURED conversation (spec videollama3.md 5.5, protocol 6.4).

The official `process_input_ids` runs regexes over the rendered, `<image>`-expanded prompt. We compute the same
result from typed turns instead, so that we also know which frames survive (each kept `<image>` run maps to a
global frame index, which the model side needs to pick features). Official quirks reproduced on purpose:
- history matching is exact string equality on stripped content: repeated questions/answers keep extra turns,
  a question with surrounding whitespace no longer equals the current question;
- with visual input the user "question" is only the FIRST LINE of the text (the regex `.` stops at a newline);
- unselected user turns keep only their frames, left open (no `<|im_end|>`), and the next user segment loses
  its `<|im_start|>user\\n` header, so kept visual prefixes are glued to what follows with no separator;
- `no` removes every frame of the conversation; a `""` answer that is selected also keeps the empty
  generation-prompt segment (it is an assistant segment with empty content).
`tests/test_rewrite.py` checks identity against a regex re-implementation of the official function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from cogstream_jax.data.selection import Selection, gt_selection, parse_selection, postprocess_generated
from cogstream_jax.data.template import (
    DEFAULT_SYSTEM_PROMPT,
    GENERATION_PROMPT,
    IM_END,
    IM_START,
    expand_image_tokens,
    item_kind,
    render_video_frames,
    tokens_per_frame,
)
from cogstream_jax.errors import InputError

MODES = ("FCC", "AC", "NC", "gt")
_FORBIDDEN_MARKERS = (IM_START, IM_END)


@dataclass(frozen=True)
class Frame:
    """One sampled frame: its index over all frames of the conversation, timestamp and merged-token count."""

    global_index: int
    timestamp: float
    num_tokens: int


@dataclass(frozen=True)
class Turn:
    """One chat turn. `text is None` means a user turn without a text item (it asks no question)."""

    role: str
    text: str | None = ""
    frames: tuple[Frame, ...] = ()

    def visual_text(self) -> str:
        """The expanded frame run `Time X.Xs:<image>...,...` with its closing newline ('' without frames)."""
        if not self.frames:
            return ""
        rendered = render_video_frames([f.timestamp for f in self.frames])
        return expand_image_tokens(rendered, [f.num_tokens for f in self.frames])

    def body(self) -> str:
        return self.visual_text() + (self.text or "")


@dataclass(frozen=True)
class RewriteResult:
    """Rewritten prompt text (expanded `<image>`), the global frame indices of its `<image>` runs in order,
    the visual flag and the selection string that produced it ('' when no filtering ran)."""

    text: str
    kept_frames: tuple[int, ...]
    if_visual: bool
    selection_output: str

    def token_ids(self, tokenizer: Any) -> list[int]:
        return list(tokenizer(self.text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class _Piece:
    role: str
    content: str
    frames: tuple[int, ...]
    is_open: bool  # an unselected user turn's visual prefix, emitted without <|im_end|>

    def render(self, with_header: bool) -> str:
        header = f"{IM_START}{self.role}\n" if with_header else ""
        return header + self.content + ("" if self.is_open else f"{IM_END}\n")


def render_turns(turns: Sequence[Turn], add_generation_prompt: bool = True) -> str:
    """The processor's expanded text for these turns (what the official rewrite receives as `original_text`)."""
    text = "".join(f"{IM_START}{t.role}\n{t.body()}{IM_END}\n" for t in turns)
    return text + (GENERATION_PROMPT if add_generation_prompt else "")


def history_of(turns: Sequence[Turn]) -> tuple[list[str], list[str], str]:
    """(history questions, history answers, current question) like the official process_history_qas."""
    questions = [t.text for t in turns if t.role == "user" and t.text is not None]
    answers = [t.text or "" for t in turns if t.role == "assistant"]
    current = questions[-1] if questions else ""
    return questions[:-1], answers, current


def _question_key(turn: Turn, if_visual: bool) -> str:
    """What the official regex reads as the question: the whole stripped text, or its first line with visuals."""
    text = (turn.text or "").strip()
    if if_visual:
        return text.split("\n", 1)[0].strip()
    return text


def _user_piece(turn: Turn, if_visual: bool, keep: Sequence[str], current: str) -> _Piece | None:
    frames = tuple(f.global_index for f in turn.frames) if if_visual else ()
    visual = turn.visual_text() if if_visual else ""
    key = _question_key(turn, if_visual)
    if key == current or key in keep:
        return _Piece("user", (visual + (turn.text or "")).strip(), frames, is_open=False)
    if if_visual and visual:
        return _Piece("user", visual.strip(), frames, is_open=True)
    return None


def _filtered_pieces(turns: Sequence[Turn], selection: Selection) -> list[_Piece]:
    hist_qs, hist_as, current = history_of(turns)
    chosen = selection.resolve(len(hist_qs))
    keep_qs = [hist_qs[i] for i in chosen]
    keep_as = [hist_as[i] for i in chosen if i < len(hist_as)]
    pieces: list[_Piece] = []
    # The generation prompt is parsed by the official code as one more (empty) assistant segment.
    for turn in [*turns, Turn("assistant", "")]:
        if turn.role == "system":
            pieces.append(_Piece("system", (turn.text or "").strip(), (), is_open=False))
        elif turn.role == "user":
            piece = _user_piece(turn, selection.if_visual, keep_qs, current)
            if piece is not None:
                pieces.append(piece)
        elif turn.role == "assistant" and (turn.text or "").strip() in keep_as:
            pieces.append(_Piece("assistant", (turn.text or "").strip(), (), is_open=False))
    return pieces


def rewrite(turns: Sequence[Turn], selection: Selection) -> RewriteResult:
    """Apply a selection to a conversation that ends with the current question (the official rewrite)."""
    check_turns(turns)
    parts: list[str] = []
    frames: list[int] = []
    previous_open = True  # a user segment first in the list also loses its header
    for piece in _filtered_pieces(turns, selection):
        glued = piece.role == "user" and previous_open
        if not (glued and not piece.render(False).strip()):
            parts.append(piece.render(with_header=not glued))
            frames.extend(piece.frames)
        previous_open = piece.is_open
    parts.append(GENERATION_PROMPT)
    return RewriteResult("".join(parts), tuple(frames), selection.if_visual, selection.format())


def unfiltered(turns: Sequence[Turn]) -> RewriteResult:
    """The processor's own prompt (first QA, AC mode): everything kept, visual on."""
    check_turns(turns)
    frames = tuple(f.global_index for t in turns for f in t.frames)
    return RewriteResult(render_turns(turns), frames, True, "")


def rewrite_for_mode(
    turns: Sequence[Turn],
    mode: str,
    *,
    predicted: str | None = None,
    gt_coi: Sequence[int] = (),
    gt_visual: bool = True,
) -> RewriteResult:
    """qa_selection's four modes. FCC takes the decoded HDR output (post-processed like select_qas), gt the
    ground-truth COI and is_visual; the first QA (no history questions) is never filtered."""
    if mode not in MODES:
        raise InputError(f"mode: unknown rewrite mode {mode!r}; expected one of {', '.join(MODES)}")
    hist_qs, _, _ = history_of(turns)
    if mode == "AC" or not hist_qs:
        return unfiltered(turns)
    if mode == "NC":
        return rewrite(turns, parse_selection("[yes]"))
    if mode == "gt":
        return rewrite(turns, gt_selection(gt_visual, gt_coi))
    if predicted is None:
        raise InputError("predicted: FCC mode needs the decoded selection output of the retrieval model")
    return rewrite(turns, parse_selection(postprocess_generated(predicted)))


def check_turns(turns: Sequence[Turn]) -> None:
    """Reject texts the official segmenter would split differently (chat markers inside a turn)."""
    for index, turn in enumerate(turns):
        for marker in _FORBIDDEN_MARKERS:
            if marker in (turn.text or ""):
                raise InputError(f"turns[{index}].text: contains the chat marker {marker!r}")


def turns_from_conversation(
    conversation: Sequence[Mapping[str, Any]],
    *,
    video_timestamps: Sequence[Sequence[float]],
    tokens_per_frame: Sequence[int] | int,
    add_system_prompt: bool = True,
) -> list[Turn]:
    """Typed turns from an official-style conversation (system/user/assistant; user content a string or
    `[video?, text]` items), the per-video global timestamps and the merged tokens of every frame in order."""
    turns: list[Turn] = []
    if add_system_prompt and conversation and conversation[0].get("role") != "system":
        turns.append(Turn("system", DEFAULT_SYSTEM_PROMPT))
    videos = iter(video_timestamps)
    frame_index = 0
    for k, message in enumerate(conversation):
        where = f"conversation[{k}]"
        role, content = message.get("role"), message.get("content")
        if isinstance(content, str):
            turns.append(Turn(str(role), content))
            continue
        if role != "user" or not isinstance(content, (list, tuple)):
            raise InputError(f"{where}.content: only user turns may carry a list of items")
        texts = [str(i["text"] if isinstance(i, Mapping) else i) for i in content if item_kind(i) == "text"]
        n_videos = sum(item_kind(i) == "video" for i in content)
        if len(texts) > 1 or n_videos > 1 or len(texts) + n_videos != len(content):
            raise InputError(f"{where}.content: expected at most one video item followed by at most one text item")
        if n_videos and item_kind(content[0]) != "video":
            raise InputError(f"{where}.content: the video item must come before the text")
        frames: tuple[Frame, ...] = ()
        if n_videos:
            stamps = next(videos, None)
            if stamps is None:
                raise InputError(f"video_timestamps: fewer entries than video items (at {where})")
            frames = tuple(
                Frame(frame_index + j, float(t), _tokens_at(tokens_per_frame, frame_index + j))
                for j, t in enumerate(stamps)
            )
            frame_index += len(frames)
        turns.append(Turn("user", texts[0] if texts else None, frames))
    if next(videos, None) is not None:
        raise InputError("video_timestamps: more entries than video items in the conversation")
    return turns


def turns_from_processor_output(
    conversation: Sequence[Mapping[str, Any]], output: Any, *, add_system_prompt: bool = True
) -> list[Turn]:
    """Typed turns for a conversation the Processor has just run on: per-video timestamps and per-frame token
    counts come from its `timestamps`, `grid_sizes`, `merge_sizes` and `modals` (video-only conversations)."""
    if any(modal != "video" for modal in output.modals):
        raise InputError("modals: the history rewrite supports video items only (CogStream has no images)")
    counts = tokens_per_frame(output.grid_sizes, output.merge_sizes)
    stamps, start = [], 0
    for grid in output.grid_sizes:
        stamps.append(list(output.timestamps[start : start + int(grid[0])]))
        start += int(grid[0])
    return turns_from_conversation(conversation, video_timestamps=stamps, tokens_per_frame=counts,
                                   add_system_prompt=add_system_prompt)


def _tokens_at(tokens_per_frame: Sequence[int] | int, index: int) -> int:
    if isinstance(tokens_per_frame, int):
        return tokens_per_frame
    if index >= len(tokens_per_frame):
        raise InputError(f"tokens_per_frame: {len(tokens_per_frame)} entries but frame {index} needs one")
    return int(tokens_per_frame[index])
