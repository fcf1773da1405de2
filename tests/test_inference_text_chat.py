"""The local-judge hook: text-only chat with our own model, plugged into the scoring judge."""
from __future__ import annotations

from cogstream_jax.inference import load_text_chat
from cogstream_jax.scoring.judges import LocalJudge


def test_text_chat_answers_and_feeds_the_local_judge():
    chat = load_text_chat("tiny", max_new_tokens=4)
    reply = chat([{"role": "system", "content": "You are a judge."}, {"role": "user", "content": "Score it."}])
    assert isinstance(reply, str)
    judge = LocalJudge("tiny")  # constructing it resolves the hook instead of raising "not available"
    assert judge.identity.startswith("local:")
