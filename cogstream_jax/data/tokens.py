"""Special token ids of the VideoLLaMA3 / Qwen2 tokenizer (from added_tokens.json, spec videollama3.md 5.1).

Kept as plain constants so that model and pipeline code can use them without loading a tokenizer;
`tests/test_template.py` checks every one against the real tokenizer files.
"""
from __future__ import annotations

ENDOFTEXT_ID = 151643  # <|endoftext|>: pad, config bos_token_id
IM_START_ID = 151644  # <|im_start|>
IM_END_ID = 151645  # <|im_end|>: eos
VISION_START_ID = 151652  # <|vision_start|>
VISION_END_ID = 151653  # <|vision_end|>
VISION_PAD_ID = 151654  # <|vision_pad|>
IMAGE_PAD_ID = 151655  # <|image_pad|> (native transformers placeholder, unused by CogReasoner)
VIDEO_PAD_ID = 151656  # <|video_pad|> (native transformers placeholder, unused by CogReasoner)
IMAGE_TOKEN_ID = 151665  # <image>: the one placeholder CogReasoner uses for images and video frames
STREAM_START_ID = 151666  # <|stream_start|>
STREAM_END_ID = 151667  # <|stream_end|>

PAD_ID = ENDOFTEXT_ID
EOS_IDS = (IM_END_ID, ENDOFTEXT_ID)  # generation_config.json eos_token_id

# Plain-text ids that the template pieces reduce to (spec 5.1).
NEWLINE_ID = 198
SYSTEM_ID = 8948
USER_ID = 872
ASSISTANT_ID = 77091
COMMA_ID = 11

# `<|im_start|>assistant\n`, the generation prompt.
GENERATION_PROMPT_IDS = (IM_START_ID, ASSISTANT_ID, NEWLINE_ID)

SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": ENDOFTEXT_ID,
    "<|im_start|>": IM_START_ID,
    "<|im_end|>": IM_END_ID,
    "<|vision_start|>": VISION_START_ID,
    "<|vision_end|>": VISION_END_ID,
    "<|vision_pad|>": VISION_PAD_ID,
    "<|image_pad|>": IMAGE_PAD_ID,
    "<|video_pad|>": VIDEO_PAD_ID,
    "<image>": IMAGE_TOKEN_ID,
    "<|stream_start|>": STREAM_START_ID,
    "<|stream_end|>": STREAM_END_ID,
}
