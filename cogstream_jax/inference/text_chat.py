"""Text-only chat with our own model: the hook `--judge local` uses (`scoring.judges.LocalJudge`).

Messages are rendered with the VideoLLaMA3 chat template, answered greedily, and decoded without special tokens.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

from cogstream_jax.inference.loading import load_model_and_processor
from cogstream_jax.model.generate import DEFAULT_EOS, generate

Messages = Sequence[Mapping[str, str]]


def load_text_chat(model_path: str, *, max_new_tokens: int = 256, dtype: str = "float32"
                   ) -> Callable[[Messages], str]:
    """`messages -> reply text` for a checkpoint folder (or the literal `tiny`)."""
    model, processor, _ = load_model_and_processor(model_path, dtype=dtype)
    eos = DEFAULT_EOS

    def chat(messages: Messages) -> str:
        batch = processor(conversation=[dict(m) for m in messages], add_system_prompt=True,
                          add_generation_prompt=True)
        ids = generate(model, batch["input_ids"], max_new_tokens=max_new_tokens, eos_token_ids=eos)
        tokens = [int(t) for t in ids[0] if int(t) not in eos]
        return processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    return chat
