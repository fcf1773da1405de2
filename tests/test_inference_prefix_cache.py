"""Prompt-prefix KV reuse (`inference.prefix_cache`) gives what a fresh `generate` gives, on growing prompts with
text and visual rows, with diverging prompts, a growing cache, sampling filters and the allowed-id constraint."""
from __future__ import annotations

import jax
import numpy as np

from cogstream_jax.inference.prefix_cache import PrefixCache, generate_with_prefix
from cogstream_jax.model.sampling import SamplingConfig
from cogstream_jax.model.generate import generate
from torch_reference import IMAGE_ID, VOCAB, reference_pair

EOS = [VOCAB + 5]  # unreachable: every call decodes all its tokens
PENALTY = SamplingConfig(do_sample=False, repetition_penalty=1.3)


def _both(model, prefix, ids, **kwargs):
    ids = np.asarray(ids, np.int32)[None]
    cached = generate_with_prefix(model, prefix, ids, eos_token_ids=EOS, pad_token_id=0, **kwargs)
    keys = kwargs.pop("visual_keys", None)
    assert keys is None or len(keys) >= int((ids == IMAGE_ID).sum())
    fresh = generate(model, ids, eos_token_ids=EOS, pad_token_id=0, bucket=True, **kwargs)
    np.testing.assert_array_equal(cached, fresh)
    return cached[0].tolist()


def test_growing_text_prompts_reuse_the_prefix_and_equal_fresh_generation():
    _, model = reference_pair()
    prefix = PrefixCache()
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, 140, 40).tolist()
    out = _both(model, prefix, prompt, max_new_tokens=6, sampling=PENALTY)
    assert prefix.reused_tokens == 0
    for turn in range(3):  # previous prompt + its answer + a new question, as a conversation grows
        previous = len(prompt)
        prompt = prompt + out + rng.integers(1, 140, 7 + turn).tolist()
        out = _both(model, prefix, prompt, max_new_tokens=6, sampling=PENALTY)
        assert prefix.reused_tokens == previous + 5  # the last generated token was never fed back
        # the kept slots were moved to the front: the only pads are those of this call's prefill
        assert None not in prefix.keys[:prefix.reused_tokens]
        assert int(prefix.cache.index) == len(prefix.keys)
    edited = list(prompt)
    edited[9] = (edited[9] + 1) % 140 + 1
    _both(model, prefix, edited, max_new_tokens=4)
    assert prefix.reused_tokens == 9
    _both(model, prefix, edited, max_new_tokens=4)  # the identical prompt: all but its last token reused
    assert prefix.reused_tokens == len(edited) - 1


def test_cache_grows_and_constraint_and_sampling_behave_as_fresh():
    _, model = reference_pair()
    prefix = PrefixCache()
    rng = np.random.default_rng(1)
    prompt = rng.integers(1, 140, 30).tolist()
    allowed = [3, 33, 101, 120]
    sampled = SamplingConfig(temperature=1.5, top_k=20, top_p=0.9, repetition_penalty=1.05)
    key = jax.random.PRNGKey(7)
    _both(model, prefix, prompt, max_new_tokens=5, sampling=sampled, key=key, allowed_token_ids=allowed)
    capacity = prefix.cache.length
    longer = prompt + rng.integers(1, 140, capacity).tolist()  # needs a larger cache than the first call made
    out = _both(model, prefix, longer, max_new_tokens=5, sampling=sampled, key=key, allowed_token_ids=allowed)
    assert prefix.cache.length > capacity and prefix.reused_tokens == len(prompt)
    assert set(out) <= set(allowed)


def test_visual_rows_are_matched_by_their_keys_not_by_the_placeholder_id():
    _, model = reference_pair()
    prefix = PrefixCache()
    rng = np.random.default_rng(2)
    features = rng.standard_normal((12, model.config.text.hidden_size)).astype(np.float32)
    text = rng.integers(1, 140, 8).tolist()
    first = text + [IMAGE_ID] * 6 + [5, 6, 7]
    keys = [("clip-a", r) for r in range(12)]
    out = _both(model, prefix, first, max_new_tokens=4, visual_features=features[:6], visual_keys=keys[:6])
    second = first + out + [8, 9] + [IMAGE_ID] * 6 + [10, 11]
    _both(model, prefix, second, max_new_tokens=4, visual_features=features, visual_keys=keys)
    assert prefix.reused_tokens == len(first) + 3
    # the same placeholders carrying other features (another encoding of the clip) are recomputed from there
    other = features.copy()
    other[2:] += 1.0
    _both(model, prefix, second, max_new_tokens=4, visual_features=other,
          visual_keys=keys[:2] + [("clip-b", r) for r in range(2, 12)])
    assert prefix.reused_tokens == len(text) + 2
