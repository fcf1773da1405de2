"""One real VideoLLaMA3 processor (and its Qwen2 tokenizer) per test session for the data tests: loading the
tokenizer from vocab/merges takes seconds, so the data-B test modules share this cached instance."""
from __future__ import annotations

import pathlib
from functools import lru_cache

REFERENCE_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference" / "videollama3-7b"


@lru_cache(maxsize=1)
def real_processor():
    from cogstream_jax.data.processor import Processor

    return Processor.from_pretrained(REFERENCE_DIR)


def real_tokenizer():
    return real_processor().tokenizer
