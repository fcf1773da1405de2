"""Time-aware k-means: our jitted JAX clustering (one Gram matrix, then 30 iterations in frame space) vs a torch
implementation that follows the official algorithm step by step (per-frame min-max normalisation loop,
per-cluster mask/mean updates), same initial centres, exactly 30 iterations each (tolerance disabled),
T = 180 frames, P = 84 tokens, D = 3584, fp32.
Headline value = torch time / JAX time. Run: `.venv/bin/python bench/kmeans.py [--repeats 3]`.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import emit, machine, median, time_call  # noqa: E402
from cogstream_jax.inference.kmeans import num_events, time_kmeans  # noqa: E402

T, P, D, ITERATIONS, ALPHA = 180, 84, 3584, 30, 2.0


def torch_official_kmeans(x: torch.Tensor, times: torch.Tensor, init: list[int], iterations: int, alpha: float):
    """The official loop structure (written for this benchmark): cdist, a Python loop normalising each frame's
    rows, argmin, then a Python loop over clusters with boolean-mask means; no early stop."""
    centers, ctimes = x[init].clone(), times[init].clone()
    k = len(init)
    assign = None
    for _ in range(iterations):
        fd = torch.cdist(x, centers, p=2)
        td = torch.abs(times.unsqueeze(1) - ctimes.unsqueeze(0))
        final = torch.zeros_like(fd)
        for t in range(x.shape[0]):
            f, d = fd[t], td[t]
            nf = (f - f.min()) / (f.max() - f.min()) if f.max() > f.min() else torch.zeros_like(f)
            nt = (d - d.min()) / (d.max() - d.min()) if d.max() > d.min() else torch.zeros_like(d)
            final[t] = torch.sqrt(nf ** 2 + alpha * nt ** 2)
        assign = final.argmin(dim=1)
        new_c, new_t = torch.zeros_like(centers), torch.zeros_like(ctimes)
        for i in range(k):
            members = assign == i
            if members.any():
                new_c[i] = x[members].mean(dim=0)
                new_t[i] = times[members].mean()
            else:
                j = int(torch.randint(0, x.shape[0], (1,)))
                new_c[i], new_t[i] = x[j], times[j]
        centers, ctimes = new_c, new_t
    return centers, ctimes, assign


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    k = num_events(T)
    means = rng.standard_normal((k, 1, D)).astype(np.float32)
    labels = np.sort(rng.integers(0, k, T))
    feats = (means[labels] + rng.standard_normal((T, P, D), dtype=np.float32)).reshape(T, P * D)
    times = np.arange(T, dtype=np.float32)
    init = rng.choice(T, k, replace=False).tolist()

    xj, tj = jax.device_put(feats), jax.device_put(times)
    key = jax.random.PRNGKey(0)

    def run_jax():  # the whole call: Gram matrix, 30 iterations, representatives, centres back on the host
        return time_kmeans(xj, tj, k, key, alpha=ALPHA, max_iterations=ITERATIONS, tol=-1.0, init_indices=init)

    xt, tt = torch.from_numpy(feats), torch.from_numpy(times)
    run_torch = lambda: torch_official_kmeans(xt, tt, init, ITERATIONS, ALPHA)  # noqa: E731
    ours = run_jax()
    _, _, ref_assign = run_torch()
    agree = float((ours.assignments == ref_assign.numpy()).mean())
    jax_s = time_call(run_jax, warmup=1, repeats=args.repeats)
    torch_s = time_call(run_torch, warmup=1, repeats=args.repeats)
    for name, ts in (("jax", jax_s), ("torch_official", torch_s)):
        print(f"{name:15s} median {median(ts) * 1000:9.1f} ms  runs {[round(t * 1000, 1) for t in ts]}")
    emit("kmeans", median(torch_s) / median(jax_s), jax_ms=round(median(jax_s) * 1000, 2),
         torch_ms=round(median(torch_s) * 1000, 2), iterations=ours.iterations, frames=T, tokens=P, dim=D,
         clusters=k, assignment_agreement=agree, machine=machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())
