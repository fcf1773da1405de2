"""CogReasoner streaming inference: clustering, event compression, dialogue retrieval, sessions."""
from __future__ import annotations

from typing import Any


def load_text_chat(model_path: str, **kwargs: Any):
    """Text-only chat with our model (`--judge local`); see `cogstream_jax.inference.text_chat`."""
    from cogstream_jax.inference.text_chat import load_text_chat as _load

    return _load(model_path, **kwargs)
