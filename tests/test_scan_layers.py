"""Decoder layers as one jax.lax.scan (model/scan_layers.py) equal the unrolled loop: loss and LoRA gradients under
LoRA dropout (each layer keeps its own masks) and every remat policy, KV-cache prefill and decode; layers that
differ (an adapter on some layers only) keep the loop."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cogstream_jax import config as configs, lora
from cogstream_jax.model.layers import lora_dropout
from cogstream_jax.model.qwen2 import KVCache
from cogstream_jax.model.scan_layers import stackable
from cogstream_jax.model.videollama3 import VideoLlama3


@pytest.fixture(scope="module")
def model():
    m = VideoLlama3(configs.tiny(), rngs=nnx.Rngs(0))
    lora.add_adapter(m, lora.FULL_MODULE, lora.full_module_spec(m.config), seed=1)
    for layer in m.language_model.layers:  # non-zero B, so the adapters (and their dropout) change the output
        for _, w in nnx.iter_modules(layer):
            if hasattr(w, "lora_b"):
                w.lora_b.set_value(0.5 * jnp.ones_like(w.lora_b[...]))
    lora.set_adapter(m, lora.FULL_MODULE)
    return m


IDS = jnp.asarray(np.random.RandomState(0).randint(0, 1000, (2, 40)), jnp.int32)


def _loss_and_grads(model, scan: bool, remat: str, masks: str, dropout: bool = True):
    model.scan_layers = scan
    graphdef, params, rest = nnx.split(model, lora.lora_filter(lora.FULL_MODULE), ...)
    model.scan_layers = False

    def loss(p, key):
        with lora_dropout(key, masks):
            out = nnx.merge(graphdef, p, rest).forward(IDS, remat=remat)
        return jnp.mean(out.logits ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss))(params, jax.random.key(3) if dropout else None)
    return float(value), jax.tree.leaves(grads)


#: gradient tolerance (x the largest |g|): fp32 sums reassociate across the scan; under dropout the unrolled loop's
#: own remat-vs-no-remat gradients differ by ~1e-3 on this model, and scan-vs-loop measured 1.3e-3 to 2.3e-3 on an
#: AMD EPYC host (2e-3 had passed on Intel hosts), so the scan is held to that level there. A layer drawing another
#: layer's masks moves the loss (checked below) and the gradients by far more
@pytest.mark.parametrize("remat, dropout, tolerance", [("full", True, 5e-3), ("none", False, 1e-4)])
def test_scan_equals_loop_loss_and_gradients(model, remat, dropout, tolerance):
    loop_loss, loop_grads = _loss_and_grads(model, False, remat, "hash", dropout)
    scan_loss, scan_grads = _loss_and_grads(model, True, remat, "hash", dropout)
    assert abs(scan_loss - loop_loss) <= 1e-5 * abs(loop_loss)
    largest = max(float(jnp.abs(g).max()) for g in loop_grads)
    assert largest > 0
    for a, b in zip(scan_grads, loop_grads):
        assert float(jnp.abs(a - b).max()) <= tolerance * largest
    if dropout:  # dropout moves the loss, so equal losses mean each layer drew the loop's masks (its own salts)
        assert abs(_loss_and_grads(model, True, remat, "hash", False)[0] - loop_loss) > 1e-4 * abs(loop_loss)


def test_scan_equals_loop_with_a_kv_cache(model):
    outs = {}
    for scan in (False, True):
        model.scan_layers = scan
        cache = KVCache.init(model.config.text, 2, 64)
        first = model.forward(IDS, cache=cache, cache_is_empty=True)
        second = model.forward(IDS[:, :1], cache=first.cache)
        outs[scan] = (np.asarray(first.logits), np.asarray(second.logits), np.asarray(second.cache.k))
    model.scan_layers = False
    for a, b in zip(outs[False], outs[True]):
        np.testing.assert_allclose(b, a, atol=1e-5 * float(np.abs(a).max()))


def test_layers_that_differ_keep_the_loop():
    m = VideoLlama3(configs.tiny(), rngs=nnx.Rngs(0))
    assert stackable(m.language_model.layers)
    spec = lora.language_module_spec(m.config)
    lora.add_adapter(m, "partial", lora.LoraSpec(spec.r, spec.alpha, spec.dropout,
                                                 tuple(t.replace("{i}", "0") for t in spec.target_modules)))
    assert not stackable(m.language_model.layers)


def test_vision_tower_scan_equals_loop(model):
    from cogstream_jax.model.frame_vision import encode_frames

    cfg = model.config.vision
    rng = np.random.RandomState(1)
    pixels = jnp.asarray(rng.randn(2, 16, cfg.patch_dim), jnp.float32)
    grid = np.stack(np.meshgrid(np.arange(4), np.arange(4), indexing="ij"), -1).reshape(16, 2)
    rows, cols = (jnp.asarray(np.broadcast_to(grid[:, k], (2, 16))) for k in (0, 1))
    valid = jnp.asarray(np.arange(16)[None] < np.array([[16], [12]]))  # the second frame is padded
    loop, scan = (jax.jit(lambda p, scan=scan: encode_frames(model.vision_encoder, p, rows, cols, valid, 2,
                                                              scan=scan))(pixels) for scan in (False, True))
    np.testing.assert_allclose(np.asarray(scan), np.asarray(loop), atol=1e-5 * float(jnp.abs(loop).max()))
