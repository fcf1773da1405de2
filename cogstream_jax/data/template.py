"""The VideoLLaMA3 chat template in plain Python, and the `<image>` expansion (spec videollama3.md 5.2-5.3).

The official processor renders a Jinja template (shipped in `assets/videollama3/chat_template.json`) with
`trim_blocks`/`lstrip_blocks`; this module emits exactly the same pieces without Jinja so that other code
(the history rewrite, the synthetic data, the streaming session) can build prompts from structured turns.
`tests/test_template.py` renders the real Jinja template and compares.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from typing import Any, Iterator, Mapping, Sequence

from cogstream_jax.errors import DataError, InputError

IMAGE_TOKEN = "<image>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
GENERATION_PROMPT = "<|im_start|>assistant\n"
CHAT_TEMPLATE_ASSET = "assets/videollama3/chat_template.json"


def reserved_strings(tokenizer) -> tuple[str, ...]:
    """The tokenizer's added-token strings (`<image>`, `<|im_end|>`, ...), longest first. Free text that spells
    one of them would be re-tokenized as that special token: an extra visual placeholder or a turn boundary."""
    return tuple(sorted(getattr(tokenizer, "added_tokens_encoder", {}) or {}, key=len, reverse=True))


def find_reserved(text: str, reserved: Sequence[str]) -> str | None:
    """The first reserved string that occurs in `text`, or None."""
    return next((token for token in reserved if token in text), None)


def strip_reserved(text: str, reserved: Sequence[str]) -> str:
    """`text` with every reserved string removed (repeated until none is left, since removing one can join
    the pieces of another)."""
    while (token := find_reserved(text, reserved)) is not None:
        text = text.replace(token, "")
    return text


@lru_cache(maxsize=1)
def load_chat_template() -> str:
    """The official Jinja chat template string (package data)."""
    text = resources.files("cogstream_jax").joinpath(CHAT_TEMPLATE_ASSET).read_text(encoding="utf-8")
    return json.loads(text)["chat_template"]


def _default_system_prompt() -> str:
    match = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", load_chat_template(), flags=re.S)
    if match is None:  # pragma: no cover - the asset is fixed
        raise DataError(f"cogstream_jax/{CHAT_TEMPLATE_ASSET}: no default system turn in field 'chat_template'")
    return match.group(1)


DEFAULT_SYSTEM_PROMPT = _default_system_prompt()


def format_timestamp(seconds: float) -> str:
    """`Time {t}s` number as the template prints it: Jinja `round(1) | string` = Python `str(round(t, 1))`."""
    return str(round(float(seconds), 1))


def render_video_frames(timestamps: Sequence[float]) -> str:
    """One `Time X.Xs:<image>` per frame joined by ',' and closed by a newline ('' for zero frames)."""
    if not len(timestamps):
        return ""
    frames = [f"Time {format_timestamp(t)}s:{IMAGE_TOKEN}" for t in timestamps]
    return ",".join(frames) + "\n"


def render_image(timestamp: float | None = None) -> str:
    """An image item: optional `Time X.Xs: ` (with a space), then `<image>` and a newline."""
    prefix = "" if timestamp is None else f"Time {format_timestamp(timestamp)}s: "
    return f"{prefix}{IMAGE_TOKEN}\n"


def role_markers(role: str) -> tuple[str, str]:
    """Opening and closing markers of a turn; the `stream` role uses `<|stream_*|>` instead of `<|im_*|>`."""
    ident = "stream" if role == "stream" else "im"
    return f"<|{ident}_start|>{role}\n", f"<|{ident}_end|>"


def item_kind(item: Any) -> str:
    """'text', 'image', 'video' or 'other', tested in the template's order (type field or key present)."""
    if isinstance(item, str):
        return "text"
    if not isinstance(item, Mapping):
        return "other"
    for kind in ("text", "image", "video"):
        if item.get("type") == kind or kind in item:
            return kind
    return "other"


def _render_item(item: Any, where: str, video_timestamps: Iterator[Sequence[float]]) -> str:
    kind = item_kind(item)
    if isinstance(item, str):
        return item
    if kind == "text":
        return str(item["text"])
    if kind == "image":
        return render_image(item.get("timestamp"))
    if kind == "video":
        try:
            timestamps = next(video_timestamps)
        except StopIteration:
            raise InputError(f"{where}: more video items than entries in video_timestamps") from None
        return render_video_frames(timestamps)
    return ""  # the template silently ignores unknown items


def render_message(message: Mapping[str, Any], where: str, video_timestamps: Iterator[Sequence[float]]) -> str:
    """Render one turn; `video_timestamps` is consumed by its video items in order."""
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
        raise DataError(f"{where}: a message needs the fields 'role' and 'content'")
    role, content = str(message["role"]), message["content"]
    start, end = role_markers(role)
    if isinstance(content, str):
        return f"{start}{content}{end}\n"
    if not isinstance(content, (list, tuple)):
        raise DataError(f"{where}: field 'content' must be a string or a list of items")
    body = "".join(_render_item(item, f"{where}.content[{k}]", video_timestamps) for k, item in enumerate(content))
    return f"{start}{body}{end}" + ("" if role == "stream" else "\n")


def render_conversation(
    conversation: Sequence[Mapping[str, Any]],
    *,
    video_timestamps: Sequence[Sequence[float]] = (),
    add_system_prompt: bool = True,
    add_generation_prompt: bool = True,
) -> str:
    """Render the official chat template with ONE `<image>` per frame (video) or per image item.

    Video items take the next entry of `video_timestamps` in order (their frame timestamps on the global
    timeline). The default VideoLLaMA3 system turn is added only when the first message is not a system one.
    """
    timestamps_iter = iter(video_timestamps)
    parts: list[str] = []
    for index, message in enumerate(conversation):
        where = f"conversation[{index}]"
        if index == 0 and add_system_prompt and isinstance(message, Mapping) and message.get("role") != "system":
            parts.append(f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n")
        parts.append(render_message(message, where, timestamps_iter))
    leftover = sum(1 for _ in timestamps_iter)
    if leftover:
        raise InputError(f"video_timestamps: {leftover} entries left over after the conversation's video items")
    if add_generation_prompt:
        parts.append(GENERATION_PROMPT)
    return "".join(parts)


def expand_image_tokens(text: str, tokens_per_image: Sequence[int]) -> str:
    """Replace the k-th `<image>` by `tokens_per_image[k]` copies (the processor's `process_text`)."""
    chunks = text.split(IMAGE_TOKEN)
    if len(chunks) - 1 != len(tokens_per_image):
        raise InputError(
            f"tokens_per_image: the text has {len(chunks) - 1} '{IMAGE_TOKEN}' markers "
            f"but {len(tokens_per_image)} counts were given"
        )
    out = [chunks[0]]
    for count, chunk in zip(tokens_per_image, chunks[1:]):
        out.append(IMAGE_TOKEN * int(count))
        out.append(chunk)
    return "".join(out)


def tokens_per_frame(grid_sizes: Sequence[Sequence[int]], merge_sizes: Sequence[int]) -> list[int]:
    """Merged-token count per `<image>` marker: t entries of (h/m)*(w/m) for each item (spec 5.3)."""
    counts: list[int] = []
    for (t, h, w), m in zip(grid_sizes, merge_sizes):
        counts.extend([int(h) // int(m) * (int(w) // int(m))] * int(t))
    return counts
