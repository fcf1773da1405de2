"""Attention implementations agree; lm_head at requested positions; KV-cache decoding and greedy generation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cogstream_jax.model.attention import MaskSpec, attend
from cogstream_jax.model.qwen2 import KVCache
from torch_reference import VIDEO_ID, random_pixels, reference_pair


def _random_qkv(b=2, t=37, s=37, h=8, k=2, d=16, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (b, t, h, d)) * 3
    kk = jax.random.normal(keys[1], (b, s, k, d)) * 3
    v = jax.random.normal(keys[2], (b, s, k, d))
    return q, kk, v


def _reference_attention(q, k, v, mask):
    rep = q.shape[2] // k.shape[2]
    k, v = np.repeat(np.asarray(k), rep, axis=2), np.repeat(np.asarray(v), rep, axis=2)
    scores = np.einsum("bthd,bshd->bhts", np.asarray(q), k) / np.sqrt(q.shape[-1])
    scores = np.where(mask[:, None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("impl", ["dense", "chunked", "xla"])
def test_attention_implementations_equal_reference(impl):
    q, k, v = _random_qkv()
    b, t = q.shape[:2]
    slots = jnp.broadcast_to(jnp.arange(t), (b, t))
    valid = jnp.ones((b, t), bool).at[0, :5].set(False)  # left padding in row 0
    spec = MaskSpec(causal=True, q_index=slots, kv_index=slots, kv_valid=valid)
    mask = np.tril(np.ones((t, t), bool))[None] & np.asarray(valid)[:, None, :]
    ours = np.asarray(attend(q, k, v, spec, impl=impl, chunk_size=8))
    ref = _reference_attention(q, k, v, mask)
    rows = np.asarray(valid)  # fully masked (padding) query rows are undefined
    np.testing.assert_allclose(ours[rows], ref[rows], atol=2e-5)


def test_chunked_model_equals_dense_model():
    _, jm = reference_pair()
    pix = random_pixels(96, 11)
    ids = np.asarray([[1, 2] + [VIDEO_ID] * 24 + list(range(3, 40))])
    dense = np.asarray(jm(ids, pix, [[4, 4, 6]], [2]).logits)
    try:
        jm.attn_impl, jm.attn_chunk_size = "chunked", 8
        chunked = np.asarray(jm(ids, pix, [[4, 4, 6]], [2]).logits)
    finally:
        jm.attn_impl, jm.attn_chunk_size = "auto", 512
    np.testing.assert_allclose(chunked, dense, atol=2e-5)


def test_logits_at_requested_positions_equal_full_logits():
    _, jm = reference_pair()
    ids = np.asarray([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    full = np.asarray(jm(ids).logits)
    want = np.asarray([[5, 2], [0, 3]])
    picked = np.asarray(jm(ids, logits_positions=want).logits)
    assert picked.shape == (2, 2, full.shape[-1])
    np.testing.assert_array_equal(picked, np.take_along_axis(full, want[..., None], axis=1))


def test_incremental_decode_equals_full_forward():
    _, jm = reference_pair()
    pix = random_pixels(96, 12)
    ids = np.asarray([[1, 2] + [VIDEO_ID] * 24 + [30, 31, 32, 33, 34, 35]])
    full = np.asarray(jm(ids, pix, [[4, 4, 6]], [2]).logits)
    prompt = 27
    cache = KVCache.init(jm.config.text, 1, ids.shape[1] + 2)
    out = jm(ids[:, :prompt], pix, [[4, 4, 6]], [2], cache=cache)
    np.testing.assert_allclose(np.asarray(out.logits), full[:, :prompt], atol=2e-5)
    cache = out.cache
    for pos in range(prompt, ids.shape[1]):
        out = jm(ids[:, pos:pos + 1], cache=cache)
        cache = out.cache
        np.testing.assert_allclose(np.asarray(out.logits)[:, 0], full[:, pos], atol=2e-5)
    assert int(cache.index) == ids.shape[1]


def _torch_generate(tm, ids, mask=None, **kwargs):
    with torch.no_grad():
        out = tm.generate(input_ids=torch.as_tensor(ids), attention_mask=None if mask is None else torch.as_tensor(mask),
                          do_sample=False, **kwargs)
    return out[:, ids.shape[1]:].numpy()


def test_greedy_generation_matches_transformers_text_batch():
    tm, jm = reference_pair()
    ids = np.asarray([[0, 0, 41, 42, 43], [51, 52, 53, 54, 55]])
    mask = np.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    ref = _torch_generate(tm, ids, mask, max_new_tokens=8, eos_token_id=[159], pad_token_id=0)
    ours = jm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_ids=[159], pad_token_id=0)
    np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
    # stop at an EOS that does occur: take the third generated token of row 1 as EOS
    eos = int(ref[1, 2])
    ref = _torch_generate(tm, ids, mask, max_new_tokens=8, eos_token_id=[eos], pad_token_id=0)
    ours = jm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_ids=[eos], pad_token_id=0)
    np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
    assert (ours[:, ref.shape[1]:] == 0).all()


def test_greedy_generation_matches_transformers_multimodal():
    tm, jm = reference_pair()
    pix = random_pixels(96, 13)
    ids = np.asarray([[1, 2] + [VIDEO_ID] * 24 + [4, 5]])
    with torch.no_grad():
        ref = tm.generate(input_ids=torch.as_tensor(ids), pixel_values_videos=torch.as_tensor(pix),
                          video_grid_thw=torch.tensor([[4, 4, 6]]), video_merge_sizes=torch.tensor([2]),
                          do_sample=False, max_new_tokens=6, eos_token_id=[159], pad_token_id=0)
    ref = ref[:, ids.shape[1]:].numpy()
    ours = jm.generate(ids, pixel_values=pix, grid_sizes=[[4, 4, 6]], merge_sizes=[2], max_new_tokens=6,
                       eos_token_ids=[159], pad_token_id=0)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("impl", ["chunked", "xla"])
def test_plain_causal_fast_path_equals_dense(impl):
    q, k, v = _random_qkv(seed=3)
    b, t = q.shape[:2]
    slots = jnp.broadcast_to(jnp.arange(t), (b, t))
    spec = MaskSpec(causal=True, q_index=slots, kv_index=slots, aligned=True)
    dense = np.asarray(attend(q, k, v, spec, impl="dense"))
    np.testing.assert_allclose(np.asarray(attend(q, k, v, spec, impl=impl, chunk_size=8)), dense, atol=2e-5)
    # no mask at all (vision frames)
    free = np.asarray(attend(q, k, v, None, impl="dense"))
    np.testing.assert_allclose(np.asarray(attend(q, k, v, None, impl=impl, chunk_size=8)), free, atol=2e-5)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policies_keep_gradients(policy):
    from flax import nnx

    _, jm = reference_pair()
    ids = jnp.asarray([[5, 6, 7, 8, 9]])
    plain = nnx.grad(lambda m: m.forward(ids).logits.sum())(jm)
    remat = nnx.grad(lambda m: m.forward(ids, remat=policy).logits.sum())(jm)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_chunked_attention_gradients_equal_dense():
    q, k, v = _random_qkv(seed=5)
    b, t = q.shape[:2]
    slots = jnp.broadcast_to(jnp.arange(t), (b, t))
    spec = MaskSpec(causal=True, q_index=slots, kv_index=slots, aligned=True)

    def loss(impl):
        return lambda q, k, v: (attend(q, k, v, spec, impl=impl, chunk_size=8) ** 2).sum()

    dense = jax.grad(loss("dense"), argnums=(0, 1, 2))(q, k, v)
    chunked = jax.grad(loss("chunked"), argnums=(0, 1, 2))(q, k, v)
    for a, b_ in zip(dense, chunked):
        np.testing.assert_allclose(np.asarray(b_), np.asarray(a), atol=1e-4, rtol=1e-4)
