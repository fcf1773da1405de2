"""`--base_quant`: frozen kernels stored quantized (int8 codes, NF4 codes two per byte) give the QLoRA numerics
(equal to a model whose kernels are qwix's quantize -> dequantize round trip), take a quarter / an eighth of the
fp32 kernel memory, shard like the kernels they replace, and refuse to have adapters merged into them."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import qwix
from flax import nnx

from cogstream_jax import config as configs, lora
from cogstream_jax.model.layers import QUANT_TILE, Linear
from cogstream_jax.model.videollama3 import VideoLlama3
from cogstream_jax.sharding import make_mesh, shard_model
from cogstream_jax.training.run_common import quantize_base

IDS = np.asarray([[1, 5, 9, 200, 7, 3, 11, 42, 8, 2]])


def _linears(model):
    """The Linears QLoRA quantizes: all but lm_head and the patch embedding (a Conv2d in the original)."""
    return [m for path, m in nnx.iter_modules(model)
            if isinstance(m, Linear) and str(path[-1]) not in ("lm_head", "patch_embedding")]


def _round_trip_model(qtype: str) -> VideoLlama3:
    """The reference: dense kernels replaced by their qwix quantize -> dequantize values."""
    model = VideoLlama3(configs.tiny(), rngs=nnx.Rngs(0))
    for linear in _linears(model):
        kernel = linear.kernel[...]
        tiled = {"tiled_axes": {0: QUANT_TILE}} if qtype == "nf4" and kernel.shape[0] % QUANT_TILE == 0 else {}
        q = qwix.quantize(kernel, qtype, channelwise_axes=(1,), **tiled)
        linear.kernel.set_value(qwix.dequantize(q))
    return model


@pytest.mark.parametrize("qtype, budget", [("int8", 0.27), ("nf4", 0.15)])
def test_stored_codes_give_qlora_numerics_in_a_fraction_of_the_memory(qtype, budget):
    model = VideoLlama3(configs.tiny(), rngs=nnx.Rngs(0))
    dense = sum(m.kernel[...].nbytes for m in _linears(model))
    assert quantize_base(model, qtype) == len(_linears(model)) == 28
    assert model.lm_head.kernel is not None and model.lm_head.quant is None
    assert model.vision_encoder.embeddings.patch_embedding.kernel is not None
    stored = sum(m.kernel_codes[...].nbytes + m.kernel_scale[...].nbytes for m in _linears(model))
    assert all(m.kernel is None for m in _linears(model))
    assert stored <= budget * dense, (stored, dense)
    ours = np.asarray(model(IDS).logits)
    reference = np.asarray(_round_trip_model(qtype)(IDS).logits)
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=1e-5)


def test_quantized_base_shards_like_the_kernels_and_refuses_merges():
    model = VideoLlama3(configs.tiny(), rngs=nnx.Rngs(0))
    quantize_base(model, "nf4")
    single = np.asarray(model(IDS).logits)
    mesh = make_mesh("1,4,2")
    shard_model(model, mesh)
    q_proj = model.language_model.layers[0].self_attn.q_proj
    assert q_proj.kernel_codes[...].sharding.spec == q_proj.base_sharding.spec
    assert any(axis is not None for axis in q_proj.base_sharding.spec)
    np.testing.assert_allclose(np.asarray(model(IDS).logits), single, atol=1e-5, rtol=1e-5)
    lora.add_adapter(model, lora.LANGUAGE_MODULE, lora.language_module_spec(model.config))
    with pytest.raises(lora.AdapterError, match="stored quantized"):
        lora.merge_adapter(model, lora.LANGUAGE_MODULE)
    assert jax.device_count() == 8
