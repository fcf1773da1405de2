"""Sharded import on 8 fake CPU devices: every parameter lands with a hand-written PartitionSpec, same numbers.

The tiny model's dimensions (vision 32/64, LLM 64/128, q 64, kv 32, vocab 160) divide every mesh axis used here,
so no axis falls back to replication. Specs are written out literally per module; layers repeat the same table.
"""
from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from cogstream_jax import load_pretrained
from cogstream_jax.sharding import make_mesh
from convert.hf_to_orbax import convert
from weights_helpers import our_logits, params_of, torch_model, write_native

# ---- mesh data=2, fsdp=2, tensor=2: FSDP over the model dimension, tensor parallel over heads / MLP / vocab
VISION_LAYER_2x2x2 = {
    ("layer_norm1", "scale"): P(), ("layer_norm1", "bias"): P(),
    ("self_attn", "q_proj", "kernel"): P("fsdp", "tensor"), ("self_attn", "q_proj", "bias"): P("tensor"),
    ("self_attn", "k_proj", "kernel"): P("fsdp", "tensor"), ("self_attn", "k_proj", "bias"): P("tensor"),
    ("self_attn", "v_proj", "kernel"): P("fsdp", "tensor"), ("self_attn", "v_proj", "bias"): P("tensor"),
    ("self_attn", "out_proj", "kernel"): P("tensor", "fsdp"), ("self_attn", "out_proj", "bias"): P("fsdp"),
    ("layer_norm2", "scale"): P(), ("layer_norm2", "bias"): P(),
    ("mlp", "fc1", "kernel"): P("fsdp", "tensor"), ("mlp", "fc1", "bias"): P("tensor"),
    ("mlp", "fc2", "kernel"): P("tensor", "fsdp"), ("mlp", "fc2", "bias"): P("fsdp"),
}
LLM_LAYER_2x2x2 = {
    ("input_layernorm", "weight"): P(),
    ("self_attn", "q_proj", "kernel"): P("fsdp", "tensor"), ("self_attn", "q_proj", "bias"): P("tensor"),
    ("self_attn", "k_proj", "kernel"): P("fsdp", "tensor"), ("self_attn", "k_proj", "bias"): P("tensor"),
    ("self_attn", "v_proj", "kernel"): P("fsdp", "tensor"), ("self_attn", "v_proj", "bias"): P("tensor"),
    ("self_attn", "o_proj", "kernel"): P("tensor", "fsdp"),
    ("post_attention_layernorm", "weight"): P(),
    ("mlp", "gate_proj", "kernel"): P("fsdp", "tensor"),
    ("mlp", "up_proj", "kernel"): P("fsdp", "tensor"),
    ("mlp", "down_proj", "kernel"): P("tensor", "fsdp"),
}
OTHERS_2x2x2 = {
    ("vision_encoder", "embeddings", "patch_embedding", "kernel"): P(None, "fsdp"),
    ("vision_encoder", "embeddings", "patch_embedding", "bias"): P("fsdp"),
    ("vision_encoder", "post_layernorm", "scale"): P(),
    ("vision_encoder", "post_layernorm", "bias"): P(),
    ("mm_projector", "readout", "0", "kernel"): P("fsdp", "tensor"),
    ("mm_projector", "readout", "0", "bias"): P("tensor"),
    ("mm_projector", "readout", "2", "kernel"): P("tensor", "fsdp"),
    ("mm_projector", "readout", "2", "bias"): P("fsdp"),
    ("language_model", "embed_tokens", "embedding"): P("tensor", "fsdp"),
    ("language_model", "norm", "weight"): P(),
    ("lm_head", "kernel"): P("fsdp", "tensor"),
}

# ---- mesh data=1, fsdp=8, tensor=1: pure FSDP, only the model dimension is split
VISION_LAYER_1x8x1 = {
    ("layer_norm1", "scale"): P(), ("layer_norm1", "bias"): P(),
    ("self_attn", "q_proj", "kernel"): P("fsdp"), ("self_attn", "q_proj", "bias"): P(),
    ("self_attn", "k_proj", "kernel"): P("fsdp"), ("self_attn", "k_proj", "bias"): P(),
    ("self_attn", "v_proj", "kernel"): P("fsdp"), ("self_attn", "v_proj", "bias"): P(),
    ("self_attn", "out_proj", "kernel"): P(None, "fsdp"), ("self_attn", "out_proj", "bias"): P("fsdp"),
    ("layer_norm2", "scale"): P(), ("layer_norm2", "bias"): P(),
    ("mlp", "fc1", "kernel"): P("fsdp"), ("mlp", "fc1", "bias"): P(),
    ("mlp", "fc2", "kernel"): P(None, "fsdp"), ("mlp", "fc2", "bias"): P("fsdp"),
}
LLM_LAYER_1x8x1 = {
    ("input_layernorm", "weight"): P(),
    ("self_attn", "q_proj", "kernel"): P("fsdp"), ("self_attn", "q_proj", "bias"): P(),
    ("self_attn", "k_proj", "kernel"): P("fsdp"), ("self_attn", "k_proj", "bias"): P(),
    ("self_attn", "v_proj", "kernel"): P("fsdp"), ("self_attn", "v_proj", "bias"): P(),
    ("self_attn", "o_proj", "kernel"): P(None, "fsdp"),
    ("post_attention_layernorm", "weight"): P(),
    ("mlp", "gate_proj", "kernel"): P("fsdp"),
    ("mlp", "up_proj", "kernel"): P("fsdp"),
    ("mlp", "down_proj", "kernel"): P(None, "fsdp"),
}
OTHERS_1x8x1 = {
    ("vision_encoder", "embeddings", "patch_embedding", "kernel"): P(None, "fsdp"),
    ("vision_encoder", "embeddings", "patch_embedding", "bias"): P("fsdp"),
    ("vision_encoder", "post_layernorm", "scale"): P(),
    ("vision_encoder", "post_layernorm", "bias"): P(),
    ("mm_projector", "readout", "0", "kernel"): P("fsdp"),
    ("mm_projector", "readout", "0", "bias"): P(),
    ("mm_projector", "readout", "2", "kernel"): P(None, "fsdp"),
    ("mm_projector", "readout", "2", "bias"): P("fsdp"),
    ("language_model", "embed_tokens", "embedding"): P(None, "fsdp"),
    ("language_model", "norm", "weight"): P(),
    ("lm_head", "kernel"): P("fsdp"),
}

EXPECTED = {"2,2,2": (VISION_LAYER_2x2x2, LLM_LAYER_2x2x2, OTHERS_2x2x2),
            "1,8,1": (VISION_LAYER_1x8x1, LLM_LAYER_1x8x1, OTHERS_1x8x1)}


def expected_specs(mesh: str, n_layers: int = 2) -> dict[tuple[str, ...], P]:
    vision, llm, others = EXPECTED[mesh]
    table = dict(others)
    for i in range(n_layers):
        table.update({("vision_encoder", "encoder", "layers", str(i), *k): v for k, v in vision.items()})
        table.update({("language_model", "layers", str(i), *k): v for k, v in llm.items()})
    return table


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_native(torch_model(), tmp_path_factory.mktemp("sharding") / "native")


@pytest.fixture(scope="module")
def unsharded(source):
    model = load_pretrained(source)
    return model, our_logits(model)


@pytest.mark.parametrize("mesh_spec,fmt", [("2,2,2", "safetensors"), ("1,8,1", "safetensors"), ("2,2,2", "orbax")])
def test_sharded_import_places_every_parameter_by_the_table(source, unsharded, tmp_path, mesh_spec, fmt):
    mesh = make_mesh(mesh_spec)
    assert mesh.devices.size == 8
    path = source
    if fmt == "orbax":
        path = tmp_path / "orbax"
        convert(str(source), str(path), "float32")
    model = load_pretrained(path, mesh=mesh)
    arrays = {tuple(map(str, p)): var.get_value() for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    expected = expected_specs(mesh_spec)
    assert set(arrays) == set(expected)
    wrong = {p: (a.sharding.spec, expected[p]) for p, a in arrays.items()
             if a.sharding.mesh.shape != mesh.shape or a.sharding.spec != expected[p]}
    assert not wrong, wrong
    reference_model, reference_logits = unsharded
    reference_params = params_of(reference_model)
    for p, a in arrays.items():
        np.testing.assert_array_equal(np.asarray(a), reference_params[p], err_msg=str(p))
    np.testing.assert_allclose(our_logits(model), reference_logits, rtol=0, atol=2e-5)

