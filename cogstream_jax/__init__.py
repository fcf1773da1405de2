"""cogstream-jax: CogReasoner (CogStream streaming video QA) on a Flax NNX VideoLLaMA3.

Heavy submodules are imported lazily so that `import cogstream_jax` stays cheap for the CLIs.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any

# Jitted prefill/decode/train steps donate their caches and states; CPU backends cannot reuse donated buffers
# and say so on every compile. The donation matters on GPU/TPU, the message does not.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable", category=UserWarning)

__version__ = "0.1.0"

_LAZY = {
    "load_pretrained": "cogstream_jax.weights.loader",
    "VideoLlama3": "cogstream_jax.model.videollama3",
    "ModelConfig": "cogstream_jax.config",
    "Processor": "cogstream_jax.data.processor",
    "StreamingSession": "cogstream_jax.inference.session",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cogstream_jax' has no attribute {name!r}")


__all__ = sorted(_LAZY)
