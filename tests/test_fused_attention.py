"""Fused attention (issue 15): the Pallas splash kernel (TPU, run here in interpret mode) and the cuDNN path's
padding rule equal dense attention, forward and gradients; "auto" resolves per target platform; explicit
choices a platform cannot run are errors; the splash path compiles for a TPU topology (compile-only devices from
libtpu, which the test environment installs: a missing libtpu fails this file, it is not skipped)."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cogstream_jax.config import tiny
from cogstream_jax.errors import ConfigError
from cogstream_jax.model.attention import (BLOCK, MaskSpec, _cudnn, attend, pad_to_block, resolve_attn_impl,
                                           splash_block)
from cogstream_jax.model.videollama3 import VideoLlama3, use_attention

# another process may hold libtpu's lock file (a concurrent compile); compile-only use needs no exclusive TPU
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

FP32_TOL = 1e-5
BF16_TOL = 2e-2  # relative to the largest magnitude: a few bf16 ulps (8 mantissa bits)


def _qkv(b, t, h, kh, d, dtype, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (b, t, h, d)) * 2
    k = jax.random.normal(keys[1], (b, t, kh, d)) * 2
    v = jax.random.normal(keys[2], (b, t, kh, d))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _llm_case(dtype):
    """Causal GQA 7:1, odd length 150 (not a multiple of any block), right padding in row 0, left in row 1."""
    b, t = 2, 150
    q, k, v = _qkv(b, t, 7, 1, 32, dtype)
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = jnp.ones((b, t), bool).at[0, 131:].set(False).at[1, :9].set(False)
    return q, k, v, MaskSpec(causal=True, q_index=slots, kv_index=slots, aligned=True, kv_valid=valid), valid


#: three sequences packed into one row of 150 (40 + 70 + 31 tokens, 9 padding): event scoring's packed rows
PACKED = (40, 70, 31)


def _packed_case(dtype):
    """Causal GQA 7:1, one row holding the sequences of `PACKED` as segments 0, 1, 2, then right padding."""
    t = 150
    q, k, v = _qkv(1, t, 7, 1, 32, dtype, seed=5)
    slots = jnp.arange(t, dtype=jnp.int32)[None]
    segments = jnp.asarray(np.repeat(np.arange(4), list(PACKED) + [t - sum(PACKED)]))[None]
    valid = slots < sum(PACKED)
    return q, k, v, MaskSpec(causal=True, q_index=slots, kv_index=slots, aligned=True, kv_valid=valid,
                             segments=segments), valid


def _vision_case(dtype):
    """Frames as the batch: 3 frames of 7x9 = 63 patches (padded to one 128 block inside), 4 heads, no mask."""
    q, k, v = _qkv(3, 63, 4, 4, 16, dtype, seed=1)
    return q, k, v, MaskSpec(), jnp.ones((3, 63), bool)


def _loss(impl, mask, valid, weights, **kw):
    """A weighted sum over the token rows (padded query rows are undefined in every implementation)."""
    def loss(q, k, v):
        out = attend(q, k, v, mask, impl=impl, **kw).astype(jnp.float32)
        return (out * weights * valid[:, :, None, None]).sum()
    return loss


def _assert_close(ours, ref, tol, what):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    err = np.abs(ours - ref).max() / max(1.0, np.abs(ref).max())
    assert err <= tol, f"{what}: max error {err:.3g} (relative to max(1, |ref|)) > {tol}"


@pytest.mark.parametrize("case", [_llm_case, _vision_case, _packed_case],
                         ids=["llm_causal_gqa_padded", "vision_frames", "packed_segments"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_splash_interpret_equals_dense_forward_and_gradients(case, dtype):
    q, k, v, mask, valid = case(dtype)
    tol = FP32_TOL if dtype == jnp.float32 else BF16_TOL
    rows = np.asarray(valid)
    # the reference: dense attention in fp32 on the same (rounded) inputs
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    ref = attend(q32, k32, v32, mask, impl="dense")
    ours = attend(q, k, v, mask, impl="splash", interpret=True)
    assert ours.dtype == dtype and ours.shape == q.shape
    _assert_close(np.asarray(ours, np.float32)[rows], np.asarray(ref)[rows], tol, "forward")
    weights = jax.random.normal(jax.random.PRNGKey(7), q.shape)
    ref_grads = jax.grad(_loss("dense", mask, valid, weights), argnums=(0, 1, 2))(q32, k32, v32)
    grads = jax.jit(jax.grad(_loss("splash", mask, valid, weights, interpret=True), argnums=(0, 1, 2)))(q, k, v)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype
        _assert_close(g, r, tol, f"d{name}")


@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_padding_rule_equals_dense(causal):
    """The cuDNN path's rotation (left padding moved behind the tokens, lengths as cuDNN's padding mask) runs here
    through the XLA implementation of the same `jax.nn.dot_product_attention` call."""
    b, t = 3, 37
    q, k, v = _qkv(b, t, 8, 2, 16, jnp.float32, seed=2)
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = jnp.ones((b, t), bool).at[0, 30:].set(False).at[1, :6].set(False)  # right, left, none
    mask = MaskSpec(causal=causal, q_index=slots, kv_index=slots, aligned=causal, kv_valid=valid)
    rows = np.asarray(valid)
    ref = np.asarray(attend(q, k, v, mask, impl="dense"))[rows]
    np.testing.assert_allclose(np.asarray(_cudnn(q, k, v, mask, implementation="xla"))[rows], ref, atol=2e-6)
    plain = MaskSpec(causal=causal, q_index=slots, kv_index=slots, aligned=causal)
    np.testing.assert_allclose(np.asarray(_cudnn(q, k, v, plain, implementation="xla")),
                               np.asarray(attend(q, k, v, plain, impl="dense")), atol=2e-6)


def test_fused_paths_under_shard_map_equal_dense():
    """On a (data 2, tensor 2) mesh of CPU devices: batch over data, kv heads over tensor (GQA 2:1 keeps each
    query head with its kv head), padding rows per shard; splash (interpret) and the cuDNN path's arithmetic."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from cogstream_jax.sharding import make_mesh

    mesh = make_mesh("data=2,fsdp=1,tensor=2", jax.devices()[:4])
    b, t = 2, 100
    q, k, v = _qkv(b, t, 4, 2, 16, jnp.float32, seed=4)
    heads = NamedSharding(mesh, P("data", None, "tensor", None))
    q, k, v = (jax.device_put(x, heads) for x in (q, k, v))
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = jax.device_put(jnp.ones((b, t), bool).at[0, 80:].set(False).at[1, :7].set(False),
                           NamedSharding(mesh, P("data")))
    mask = MaskSpec(causal=True, q_index=slots, kv_index=slots, aligned=True, kv_valid=valid)
    rows = np.asarray(valid)
    ref = np.asarray(attend(q, k, v, mask, impl="dense"))[rows]
    splash = jax.jit(lambda a, b_, c: attend(a, b_, c, mask, impl="splash", mesh=mesh, interpret=True))(q, k, v)
    _assert_close(np.asarray(splash)[rows], ref, FP32_TOL, "splash on a mesh")
    cudnn = jax.jit(lambda a, b_, c: _cudnn(a, b_, c, mask, mesh=mesh, implementation="xla"))(q, k, v)
    _assert_close(np.asarray(cudnn)[rows], ref, FP32_TOL, "cuDNN path on a mesh")


@pytest.mark.parametrize("impl", ["dense", "chunked", "splash", "cudnn"])
def test_packed_segments_equal_separate_sequences(impl, monkeypatch):
    """Each segment of a packed row computes what it computes alone (plain causal attention over just its
    tokens): the reference is independent of the segment masking. jax's cuDNN call takes no segment ids: where
    cuDNN is the resolved choice (a GPU, simulated here), a packed row takes the XLA path, never the kernel."""
    from cogstream_jax.model import attention

    q, k, v, mask, _ = _packed_case(jnp.float32)
    starts = np.cumsum((0,) + PACKED)
    alone = [attend(q[:, a:b], k[:, a:b], v[:, a:b], MaskSpec(causal=True, q_index=jnp.arange(b - a)[None],
                                                              kv_index=jnp.arange(b - a)[None], aligned=True),
                    impl="dense") for a, b in zip(starts[:-1], starts[1:])]
    kw = dict(chunk_size=32) if impl == "chunked" else dict(interpret=True) if impl == "splash" else {}
    if impl == "cudnn":
        monkeypatch.setattr(attention, "resolve_attn_impl", lambda *a, **k: "cudnn")
        monkeypatch.setattr(attention, "_cudnn", lambda *a, **k: pytest.fail("cuDNN got segment ids"))
    out = np.asarray(attend(q, k, v, mask, impl=impl, **kw))
    for a, b, ref in zip(starts[:-1], starts[1:], alone):
        _assert_close(out[:, a:b], ref, FP32_TOL, f"{impl}: segment of {b - a} tokens")


def test_block_padding_rule():
    assert BLOCK == 128
    assert [pad_to_block(n) for n in (0, 1, 127, 128, 129, 16000)] == [128, 128, 128, 128, 256, 16000]
    assert [splash_block(n) for n in (128, 256, 384, 1024, 1536)] == [128, 256, 128, 512, 512]


def test_auto_resolution_per_platform_and_explicit_errors():
    assert resolve_attn_impl("auto", "tpu") == "splash"
    assert resolve_attn_impl("auto", "cuda", jnp.bfloat16) == "cudnn"
    assert resolve_attn_impl("auto", "gpu", jnp.float32) == "xla"  # cuDNN flash takes bf16/fp16 only
    assert resolve_attn_impl("auto", "cpu", jnp.bfloat16) == "xla"
    assert resolve_attn_impl("splash", "cpu", interpret=True) == "splash"
    for impl, platform, dtype, reason in [("splash", "cpu", None, "TPU only"), ("splash", "gpu", None, "TPU only"),
                                          ("cudnn", "tpu", None, "NVIDIA GPU"), ("cudnn", "gpu", jnp.float32, "bfloat16"),
                                          ("flash", "gpu", None, "choose from")]:
        with pytest.raises(ConfigError, match=reason):
            resolve_attn_impl(impl, platform, dtype)
    q, k, v = _qkv(1, 8, 2, 1, 8, jnp.float32)
    for impl in ("splash", "cudnn"):  # attend resolves for the default backend (CPU here): never a silent fallback
        with pytest.raises(ConfigError, match=impl):
            attend(q, k, v, None, impl=impl)
    model = nnx.eval_shape(lambda: VideoLlama3(tiny(vocab_size=512)))
    with pytest.raises(ConfigError, match="NVIDIA GPU"):
        use_attention(model, "cudnn")
    assert use_attention(model, "auto") == "xla" and model.attn_impl == "xla"


def _tiny_model(dtype=jnp.float32):
    """The tiny config with q/k projections scaled up: random init otherwise makes attention nearly uniform and
    hides masking bugs."""
    model = VideoLlama3(tiny(vocab_size=512), rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype)
    for layer in list(model.language_model.layers) + list(model.vision_encoder.encoder.layers):
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            proj.kernel.set_value(proj.kernel[...] * 12)
    return model


def test_model_with_splash_equals_model_with_dense():
    """Vision frames (2 frames of 4x6 patches: 24 per frame, padded to 128 inside) and a right-padded prompt of
    odd length through the whole tiny model, splash (interpret mode) vs dense, fp32."""
    model = _tiny_model()
    cfg = model.config
    tokens = 2 * (4 // 2) * (6 // 2)
    ids = np.asarray([[1, 2] + [cfg.image_token_id] * tokens + list(range(3, 30)) + [0] * 6])
    mask = (np.arange(ids.shape[1]) < ids.shape[1] - 6).astype(np.int32)[None]
    pixels = np.random.default_rng(0).standard_normal((2 * 4 * 6, 588)).astype(np.float32)
    args = (ids, pixels, [[2, 4, 6]], [2])
    use_attention(model, "dense")
    dense = np.asarray(model(*args, attention_mask=mask).logits)
    assert use_attention(model, "splash", interpret=True) == "splash"
    splash = np.asarray(model(*args, attention_mask=mask).logits)
    rows = mask[0].astype(bool)
    np.testing.assert_allclose(splash[:, rows], dense[:, rows], atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")  # TPU programs: compile-only
def test_splash_compiles_for_a_tpu_topology():
    """Compile-only TPU devices (v5e 2x2) on this CPU host: the sharded splash path (batch over data, kv heads
    over tensor) and its gradient lower to Mosaic kernels, and `use_attention` resolves "auto" from the mesh."""
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec as P

    from cogstream_jax.sharding import make_mesh

    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    mesh = make_mesh("data=2,fsdp=1,tensor=2", devices)
    b, t, h, kh, d = 4, 200, 14, 2, 128

    def loss(q, k, v, valid, frames):
        slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        spec = MaskSpec(causal=True, q_index=slots, kv_index=slots, aligned=True, kv_valid=valid)
        text = attend(q, k, v, spec, impl="splash", mesh=mesh)
        vision = attend(frames, frames, frames, None, impl="auto", mesh=mesh)
        return (text.astype(jnp.float32) ** 2).sum() + (vision.astype(jnp.float32) ** 2).sum()

    heads = NamedSharding(mesh, P("data", None, "tensor", None))
    args = (jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16, sharding=heads),
            jax.ShapeDtypeStruct((b, t, kh, d), jnp.bfloat16, sharding=heads),
            jax.ShapeDtypeStruct((b, t, kh, d), jnp.bfloat16, sharding=heads),
            jax.ShapeDtypeStruct((b, t), jnp.bool_, sharding=NamedSharding(mesh, P("data"))),
            jax.ShapeDtypeStruct((6, 63, 4, 72), jnp.bfloat16, sharding=heads))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4))).lower(*args).compile()
    text = compiled.as_text()
    # forward, dq and dkv kernels for each of the two attention calls
    assert text.count("tpu_custom_call") >= 6, "the splash kernels are missing from the TPU program"


@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
def test_model_compiles_for_a_tpu_topology_with_auto_attention():
    """The compile-check use: `use_attention(model, "auto", mesh=tpu_mesh)` on an abstract bf16 model picks splash,
    and the tiny model's forward (vision frames of 14x24 patches, a right-padded prompt) compiles for v5e 2x2
    with one Mosaic kernel per attention layer."""
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec as P

    from cogstream_jax.model.vision import VisualLayout
    from cogstream_jax.sharding import make_mesh, state_shardings

    mesh = make_mesh("data=2,fsdp=1,tensor=2", topologies.get_topology_desc(topology_name="v5e:2x2",
                                                                          platform="tpu").devices)
    cfg = tiny(vocab_size=512)
    model = nnx.eval_shape(lambda: VideoLlama3(cfg, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16))
    assert use_attention(model, "auto", mesh=mesh) == "splash" and model.attn_mesh is mesh
    with pytest.raises(ConfigError, match="NVIDIA GPU"):
        use_attention(model, "cudnn", mesh=mesh)
    use_attention(model, "auto", mesh=mesh)
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    state = treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                               for x, s in zip(leaves, jax.tree.leaves(state_shardings(state, mesh)))])
    layout = VisualLayout(((4, 14, 24),), (2,))

    def forward(state, ids, pixels, mask):
        return nnx.merge(graphdef, state).forward(ids, pixel_values=pixels, layout=layout, attention_mask=mask,
                                                  compute_logits=False).hidden_states

    rows = NamedSharding(mesh, P("data"))
    compiled = jax.jit(forward).lower(
        state, jax.ShapeDtypeStruct((2, 640), jnp.int32, sharding=rows),
        jax.ShapeDtypeStruct((layout.num_patches, 588), jnp.float32, sharding=NamedSharding(mesh, P())),
        jax.ShapeDtypeStruct((2, 640), jnp.int32, sharding=rows)).compile()
    layers = cfg.vision.num_hidden_layers + cfg.text.num_hidden_layers
    assert compiled.as_text().count("tpu_custom_call") == layers
