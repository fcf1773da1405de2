"""Chat template + `<image>` expansion: against the real Jinja template, the spec's worked example (5.4) and
the real Qwen2 tokenizer files."""
from __future__ import annotations

import pathlib

import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cogstream_jax.data import tokens
from cogstream_jax.data.template import (
    DEFAULT_SYSTEM_PROMPT,
    IMAGE_TOKEN,
    expand_image_tokens,
    load_chat_template,
    render_conversation,
    render_video_frames,
    tokens_per_frame,
)
from cogstream_jax.errors import DataError, InputError

REFERENCE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference" / "videollama3-7b"

WORKED_EXAMPLE_IDS = (
    [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]
    + [1462, 220, 15, 13, 15, 82, 25] + [151665] * 6 + [11, 1462, 220, 16, 13, 15, 82, 25] + [151665] * 6 + [198]
    + [3838, 374, 279, 883, 3730, 30, 151645, 198, 151644, 77091, 198]
)


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(REFERENCE), trust_remote_code=False)


def jinja_render(conversation, video_timestamps, add_system_prompt=True, add_generation_prompt=True) -> str:
    """The official path: fill num_frames/timestamps into video items and render the shipped Jinja template
    the way transformers does (trim_blocks, lstrip_blocks)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    stamps = iter(video_timestamps)
    messages = []
    for message in conversation:
        content = message["content"]
        if isinstance(content, list):
            content = [dict(item) if isinstance(item, dict) else item for item in content]
            for item in content:
                if isinstance(item, dict) and item.get("type") == "video":
                    ts = next(stamps)
                    item.update(num_frames=len(ts), timestamps=list(ts))
        messages.append({"role": message["role"], "content": content})
    return env.from_string(load_chat_template()).render(
        messages=messages, add_system_prompt=add_system_prompt,
        add_generation_prompt=add_generation_prompt, image_token=IMAGE_TOKEN)


def video(path: str) -> dict:
    return {"type": "video", "video": {"video_path": path, "fps": 1, "max_frames": 180}}


CONVERSATIONS = {
    "worked_example": (
        [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": [video("a.mp4"), {"type": "text", "text": "What is the man doing?"}]}],
        [[0.0, 1.0]],
    ),
    "default_system_two_segments": (
        [{"role": "user", "content": [video("s1.mp4"), {"type": "text", "text": "Q1?"}]},
         {"role": "assistant", "content": "A1."},
         {"role": "user", "content": "Q2?"},
         {"role": "assistant", "content": "A2."},
         {"role": "user", "content": [video("s2.mp4"), {"type": "text", "text": "Q3?"}]}],
        [[0.0, 1.0, 2.0], [3.0, 4.0, 12.25, 7.05]],
    ),
    "image_stream_and_odd_items": (
        [{"role": "user", "content": ["plain string item ",
                                      {"type": "image", "image": "x.png"},
                                      {"type": "image", "image": "y.png", "timestamp": 2.349},
                                      {"text": "text without type"}, {"type": "unknown"}]},
         {"role": "stream", "content": [video("s.mp4")]},
         {"role": "stream", "content": "string stream"},
         {"role": "user", "content": [video("empty.mp4"), "after empty"]}],
        [[0.0, 0.35, 1e6 + 0.05], []],
    ),
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("flags", [(True, True), (False, False), (True, False)])
def test_render_equals_official_jinja_template(name, flags):
    conversation, stamps = CONVERSATIONS[name]
    ours = render_conversation(conversation, video_timestamps=stamps,
                               add_system_prompt=flags[0], add_generation_prompt=flags[1])
    assert ours == jinja_render(conversation, stamps, *flags)


def test_worked_example_string_and_53_ids(tokenizer):
    conversation, stamps = CONVERSATIONS["worked_example"]
    text = render_conversation(conversation, video_timestamps=stamps)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "Time 0.0s:<image>,Time 1.0s:<image>\nWhat is the man doing?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # 56x84 px frames: grid (2, 4, 6) patches, merge 2 -> 6 tokens per frame.
    expanded = expand_image_tokens(text, tokens_per_frame([(2, 4, 6)], [2]))
    ids = tokenizer(expanded)["input_ids"]
    assert ids == WORKED_EXAMPLE_IDS and len(ids) == 53


def test_two_segment_conversation_matches_hand_written_rendering(tokenizer):
    conversation = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [video("seg1.mp4"), {"type": "text", "text": "What is he holding?"}]},
        {"role": "assistant", "content": "A red umbrella."},
        {"role": "user", "content": "What colour is it?"},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": [video("seg2.mp4"), {"type": "text", "text": "Why did he open it?"}]},
    ]
    text = render_conversation(conversation, video_timestamps=[[0.0, 1.0], [2.0, 3.0, 4.0]])
    hand = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nTime 0.0s:<image>,Time 1.0s:<image>\nWhat is he holding?<|im_end|>\n"
            "<|im_start|>assistant\nA red umbrella.<|im_end|>\n"
            "<|im_start|>user\nWhat colour is it?<|im_end|>\n"
            "<|im_start|>assistant\nRed.<|im_end|>\n"
            "<|im_start|>user\nTime 2.0s:<image>,Time 3.0s:<image>,Time 4.0s:<image>\n"
            "Why did he open it?<|im_end|>\n<|im_start|>assistant\n")
    assert text == hand
    expanded = expand_image_tokens(text, [2, 2, 3, 3, 3])
    assert expanded.count(IMAGE_TOKEN) == 13
    assert "Time 1.0s:<image><image>\nWhat" in expanded
    ids = tokenizer(expanded)["input_ids"]
    assert ids.count(tokens.IMAGE_TOKEN_ID) == 13
    assert ids[-3:] == list(tokens.GENERATION_PROMPT_IDS)


def test_default_system_prompt_and_timestamp_rounding():
    assert DEFAULT_SYSTEM_PROMPT.startswith("You are VideoLLaMA3 created by Alibaba DAMO Academy")
    text = render_conversation([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert text == f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    assert render_video_frames([0, 2.25, 2.35, 12.0]) == (
        "Time 0.0s:<image>,Time 2.2s:<image>,Time 2.4s:<image>,Time 12.0s:<image>\n")
    assert render_video_frames([]) == ""


def test_special_token_constants_match_tokenizer(tokenizer):
    for text, token_id in tokens.SPECIAL_TOKENS.items():
        assert tokenizer.convert_tokens_to_ids(text) == token_id, text
    assert tokenizer("\n")["input_ids"] == [tokens.NEWLINE_ID]
    assert tokenizer("<|im_start|>assistant\n")["input_ids"] == list(tokens.GENERATION_PROMPT_IDS)
    assert tokenizer.eos_token_id == tokens.IM_END_ID


def test_bad_inputs_name_the_field():
    with pytest.raises(InputError, match="tokens_per_image"):
        expand_image_tokens("a<image>b<image>", [3])
    with pytest.raises(InputError, match="video_timestamps"):
        render_conversation([{"role": "user", "content": [video("a.mp4")]}], video_timestamps=[])
    with pytest.raises(InputError, match="left over"):
        render_conversation([{"role": "user", "content": "q"}], video_timestamps=[[0.0]])
    with pytest.raises(DataError, match=r"conversation\[1\].*'content'"):
        render_conversation([{"role": "user", "content": "q"}, {"role": "user"}])
