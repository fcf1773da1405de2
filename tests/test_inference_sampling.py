"""Sampling filters equal transformers' logits processors; generation (greedy, penalised, constrained, sampled,
bucketed) agrees with transformers and with full recomputation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from cogstream_jax.errors import ConfigError
from cogstream_jax.model.sampling import SamplingConfig, mark_seen, process_logits
from cogstream_jax.model.generate import bucket_length, generate
from cogstream_jax.reference_files import bundled_model_dir
from torch_reference import VOCAB, reference_pair


def _hf_process(logits, input_ids, cfg: SamplingConfig):
    scores = torch.as_tensor(logits)
    ids = torch.as_tensor(input_ids)
    scores = RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty)(ids, scores)
    if cfg.do_sample:
        scores = TemperatureLogitsWarper(cfg.temperature)(ids, scores)
        if cfg.top_k:
            scores = TopKLogitsWarper(cfg.top_k)(ids, scores)
        scores = TopPLogitsWarper(cfg.top_p)(ids, scores)
    return scores.numpy()


@pytest.mark.parametrize("cfg", [
    SamplingConfig(),  # the generation_config.json defaults
    SamplingConfig(temperature=1.3, top_k=0, top_p=0.5, repetition_penalty=1.2),
    SamplingConfig(temperature=0.5, top_k=7, top_p=1.0, repetition_penalty=1.0),
    SamplingConfig(do_sample=False, repetition_penalty=1.05),
])
def test_filters_equal_transformers_processors(cfg):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 500)) * 4).astype(np.float32)
    input_ids = rng.integers(0, 500, size=(3, 40))
    seen = mark_seen(jnp.zeros((3, 500), bool), jnp.asarray(input_ids))
    ours = np.asarray(process_logits(jnp.asarray(logits), seen, cfg))
    ref = _hf_process(logits, input_ids, cfg)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-6)


def test_defaults_come_from_generation_config():
    cfg = SamplingConfig.from_generation_config(bundled_model_dir())
    assert cfg == SamplingConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingConfig(temperature=0)


def test_greedy_with_repetition_penalty_matches_transformers():
    tm, jm = reference_pair()
    ids = np.asarray([[5, 9, 9, 17, 23, 5, 40, 41]])
    with torch.no_grad():
        ref = tm.generate(input_ids=torch.as_tensor(ids), do_sample=False, max_new_tokens=10, repetition_penalty=1.3,
                          eos_token_id=[159], pad_token_id=0)[:, ids.shape[1]:].numpy()
    cfg = SamplingConfig(do_sample=False, repetition_penalty=1.3)
    ours = generate(jm, ids, max_new_tokens=10, sampling=cfg, eos_token_ids=[159], pad_token_id=0)
    np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)


def test_cached_decode_equals_full_recomputation_and_buckets_change_nothing():
    _, jm = reference_pair()
    ids = np.asarray([[3, 14, 15, 92, 65, 35, 89, 79, 32]])
    out = generate(jm, ids, max_new_tokens=8, eos_token_ids=[159], pad_token_id=0)
    full = np.asarray(jm(np.concatenate([ids, out], axis=1)).logits)
    recomputed = full[0, ids.shape[1] - 1:-1].argmax(-1)
    np.testing.assert_array_equal(out[0], recomputed)
    bucketed = generate(jm, ids, max_new_tokens=8, eos_token_ids=[159], pad_token_id=0, bucket=True)
    np.testing.assert_array_equal(bucketed, out)
    assert bucket_length(9) == 64 and bucket_length(65) == 96 and bucket_length(97) == 128 and bucket_length(129) == 192


def test_constrained_decoding_only_emits_allowed_ids():
    _, jm = reference_pair()
    ids = np.asarray([[7, 8, 9, 10, 11]])
    allowed = [3, 33, 101, 159]
    cfg = SamplingConfig(temperature=1.5, top_k=0, top_p=1.0, repetition_penalty=1.05)
    for seed in range(3):
        out = generate(jm, ids, max_new_tokens=12, sampling=cfg, key=jax.random.PRNGKey(seed),
                       allowed_token_ids=allowed, eos_token_ids=[159], pad_token_id=0)
        emitted = out[0][: (list(out[0]).index(159) + 1) if 159 in out[0] else None]
        assert set(emitted.tolist()) <= set(allowed)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    _, jm = reference_pair()
    ids = np.asarray([[21, 22, 23, 24]])
    cfg = SamplingConfig(temperature=2.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    a = generate(jm, ids, max_new_tokens=10, sampling=cfg, key=jax.random.PRNGKey(1), eos_token_ids=[VOCAB + 5])
    b = generate(jm, ids, max_new_tokens=10, sampling=cfg, key=jax.random.PRNGKey(1), eos_token_ids=[VOCAB + 5])
    c = generate(jm, ids, max_new_tokens=10, sampling=cfg, key=jax.random.PRNGKey(2), eos_token_ids=[VOCAB + 5])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    one = SamplingConfig(temperature=0.7, top_k=1, top_p=0.8, repetition_penalty=1.0)
    greedy = generate(jm, ids, max_new_tokens=10, eos_token_ids=[VOCAB + 5])
    sampled = generate(jm, ids, max_new_tokens=10, sampling=one, key=jax.random.PRNGKey(3), eos_token_ids=[VOCAB + 5])
    np.testing.assert_array_equal(sampled, greedy)
