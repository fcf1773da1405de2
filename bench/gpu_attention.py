"""cuDNN flash attention vs dense attention on a GPU (issue 15), part of `bench/gpu_check.sh`.

Checks, each printed as PASS/FAIL with its error:
1. `attend(impl="cudnn")` equals dense attention (fp32 reference on the same bf16 inputs), forward and gradients:
   causal GQA 7:1 (Qwen2.5-7B's 28/4 heads, head_dim 128) with right and left padding at an odd length, and
   vision frames as the batch (16 heads of 72, 14x24 = 336 patches per frame, no mask);
2. the tiny model with cuDNN equals the tiny model with dense attention (bf16 logits);
3. an explicit "cudnn" in fp32 is refused (cuDNN flash takes bf16/fp16 only) and "auto" picks "xla" there.
Then one timing: a 7B-shaped causal prefill attention (T = `--length`), forward and backward, cuDNN vs the XLA
chunked path. Prints one JSON line last (`value` = number of failed checks; 0 is a pass).
A CPU smoke run (`--smoke`) runs the same plumbing with the XLA implementation of the same call.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import emit  # noqa: E402
from cogstream_jax.errors import ConfigError  # noqa: E402
from cogstream_jax.model import attention  # noqa: E402
from cogstream_jax.model.attention import MaskSpec, attend, resolve_attn_impl  # noqa: E402

BF16_TOL = 2e-2  # max error relative to max(1, |reference|): a few bf16 ulps


def stack_versions() -> dict[str, str]:
    """Versions of the stack the figures come from (jax, jaxlib, plugins, flax, cuDNN, the device)."""
    import importlib.metadata as md

    out = {}
    for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "jax-cuda12-pjrt",
                 "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version

        out["cudnn"] = str(check_cudnn_version())
    except Exception as e:  # noqa: BLE001 - CPU runs, or an API that moved
        out["cudnn"] = f"unknown ({type(e).__name__})"
    out["python"] = sys.version.split()[0]
    out["device"] = jax.devices()[0].device_kind
    out["backend"] = jax.default_backend()
    return out


def _qkv(b, t, h, kh, d, seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (b, t, h, d)) * 2
    k = jax.random.normal(keys[1], (b, t, kh, d)) * 2
    v = jax.random.normal(keys[2], (b, t, kh, d))
    return q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    return float(np.abs(ours - ref).max() / max(1.0, np.abs(ref).max()))


def fused(q, k, v, mask, smoke: bool):
    if smoke:  # the cuDNN path's arithmetic through the XLA implementation of the same call (CPU)
        return attention._cudnn(q, k, v, mask, implementation="xla")
    return attend(q, k, v, mask, impl="cudnn")


def parity_case(name, q, k, v, mask, valid, smoke) -> dict:
    rows = np.asarray(valid)
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    weights = jax.random.normal(jax.random.PRNGKey(9), q.shape)

    weights = weights * valid[:, :, None, None]  # padded query rows are undefined in every implementation

    def loss(fn):  # weights as an argument, not a folded constant
        return lambda q_, k_, v_, w: (fn(q_, k_, v_).astype(jnp.float32) * w).sum()

    ref = attend(q32, k32, v32, mask, impl="dense")
    ours = jax.jit(lambda a, b, c: fused(a, b, c, mask, smoke))(q, k, v)
    errors = {"out": _rel_err(np.asarray(ours, np.float32)[rows], np.asarray(ref)[rows])}
    ref_g = jax.jit(jax.grad(loss(lambda a, b, c: attend(a, b, c, mask, impl="dense")), argnums=(0, 1, 2)))(
        q32, k32, v32, weights)
    our_g = jax.jit(jax.grad(loss(lambda a, b, c: fused(a, b, c, mask, smoke)), argnums=(0, 1, 2)))(
        q, k, v, weights)
    errors.update({f"d{n}": _rel_err(g, r) for n, g, r in zip("qkv", our_g, ref_g)})
    ok = all(e <= BF16_TOL for e in errors.values())
    detail = ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
    print(f"{'PASS' if ok else 'FAIL'} cudnn == dense ({name}): {detail}")
    return {"name": name, "ok": ok, **{k: round(v, 6) for k, v in errors.items()}}


def model_parity(smoke: bool) -> dict:
    from flax import nnx

    from cogstream_jax.config import tiny
    from cogstream_jax.model.videollama3 import VideoLlama3, use_attention

    model = VideoLlama3(tiny(vocab_size=512), rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    for layer in list(model.language_model.layers) + list(model.vision_encoder.encoder.layers):
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):  # sharper attention: masking bugs show
            proj.kernel.set_value(proj.kernel[...] * 12)
    cfg = model.config
    ids = np.asarray([[1, 2] + [cfg.image_token_id] * 12 + list(range(3, 40)) + [0] * 9])
    mask = (np.arange(ids.shape[1]) < ids.shape[1] - 9).astype(np.int32)[None]
    pixels = np.random.default_rng(0).standard_normal((2 * 4 * 6, 588)).astype(np.float32)
    args = (ids, pixels, [[2, 4, 6]], [2])
    use_attention(model, "dense")
    dense = np.asarray(model(*args, attention_mask=mask).logits, np.float32)
    resolved = use_attention(model, "xla" if smoke else "cudnn")
    ours = np.asarray(model(*args, attention_mask=mask).logits, np.float32)
    rows = mask[0].astype(bool)
    err = _rel_err(ours[:, rows], dense[:, rows])
    ok = err <= 5e-2  # bf16 through 4 layers (2 vision + 2 text): rounding differences compound
    print(f"{'PASS' if ok else 'FAIL'} tiny model {resolved} == dense (bf16 logits): {err:.2e}")
    return {"name": "tiny_model", "ok": ok, "logits": round(err, 6), "impl": resolved}


def fp32_refusal() -> dict:
    auto = resolve_attn_impl("auto", "gpu", jnp.float32)
    try:
        resolve_attn_impl("cudnn", "gpu", jnp.float32)
        refused = False
    except ConfigError as e:
        refused = "bfloat16" in str(e)
    ok = refused and auto == "xla"
    print(f"{'PASS' if ok else 'FAIL'} fp32: explicit cudnn refused ({refused}), auto -> {auto}")
    return {"name": "fp32_refusal", "ok": ok}


def timing(length: int, smoke: bool, repeats: int = 5) -> dict:
    """7B-shaped causal prefill attention (28 query / 4 kv heads of 128), one row, fwd+bwd: cuDNN vs chunked."""
    q, k, v = _qkv(1, length, 28, 4, 128, seed=3)
    slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (1, length))
    valid = jnp.ones((1, length), bool)
    mask = MaskSpec(causal=True, q_index=slots, kv_index=slots, aligned=True, kv_valid=valid)
    out = {}
    impls = {"cudnn": lambda a, b, c: fused(a, b, c, mask, smoke),
             "xla_chunked": lambda a, b, c: attend(a, b, c, mask, impl="chunked", chunk_size=1024)}
    for name, fn in impls.items():
        fwd = jax.jit(fn)
        bwd = jax.jit(jax.grad(lambda a, b, c, fn=fn: fn(a, b, c).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
        for label, f in (("fwd", fwd), ("fwd_bwd", bwd)):
            jax.block_until_ready(f(q, k, v))
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(f(q, k, v))
                times.append(time.perf_counter() - start)
            out[f"{name}_{label}_ms"] = round(1e3 * float(np.median(times)), 3)
    flops = 2 * 2 * length * length / 2 * 28 * 128  # QK^T and PV over the causal half
    out["cudnn_fwd_tflops"] = round(flops / (out["cudnn_fwd_ms"] / 1e3) / 1e12, 1)
    print(f"timing T={length}: " + ", ".join(f"{k} {v}" for k, v in out.items()))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--length", type=int, default=16384, help="tokens of the timed 7B-shaped prefill attention")
    p.add_argument("--smoke", action="store_true", help="CPU: XLA implementation of the cuDNN call, small timing")
    args = p.parse_args(argv)
    versions = stack_versions()
    print("stack: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if not args.smoke and jax.default_backend() != "gpu":
        print("no GPU: run with --smoke on CPU", file=sys.stderr)
        return 2
    b, t = 2, 1000
    q, k, v = _qkv(b, t, 28, 4, 128, seed=0)
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = jnp.ones((b, t), bool).at[0, 937:].set(False).at[1, :61].set(False)  # right / left padding
    llm = MaskSpec(causal=True, q_index=slots, kv_index=slots, aligned=True, kv_valid=valid)
    checks = [parity_case("causal GQA 7:1, padded, T=1000", q, k, v, llm, valid, args.smoke)]
    q, k, v = _qkv(6, 336, 16, 16, 72, seed=1)
    checks.append(parity_case("vision: 6 frames x 336 patches", q, k, v, MaskSpec(), jnp.ones((6, 336), bool),
                              args.smoke))
    checks.append(model_parity(args.smoke))
    checks.append(fp32_refusal())
    timed = timing(512 if args.smoke else args.length, args.smoke, repeats=2 if args.smoke else 5)
    failed = sum(not c["ok"] for c in checks)
    emit("gpu_attention", failed, value_is="failed checks (0 = pass)", checks=checks, timing=timed,
         stack=versions)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
