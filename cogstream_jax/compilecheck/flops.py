"""FLOPs of programs that run loops: layers as one scan, stage 1's micro-batch accumulation.

XLA's cost analysis counts a while loop's body once, whatever its trip count, so a program whose 28 decoder layers
are a `jax.lax.scan` reports about one layer's FLOPs, and a stage-1 step that accumulates 8 micro-batches reports
one micro-batch's. The same job compiled with its micro-batches unrolled and its layers unrolled at 1 and 2
layers (text and vision tower varied separately; small programs, quick to compile) gives the cost per layer of each
tower, and FLOPs(L_text, L_vision) = F(1, 1) + (L_text - 1) * (F(2, 1) - F(1, 1)) + (L_vision - 1) * (F(1, 2) - F(1, 1))
is what the unrolled program would report (every layer of a tower costs the same). tests/test_compile_check.py
compares it with an unrolled compile.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from jax.sharding import Mesh

from cogstream_jax.config import ModelConfig

VARIANTS = ((1, 1), (2, 1), (1, 2))  # (text layers, vision layers)


def with_layers(config: ModelConfig, text: int, vision: int) -> ModelConfig:
    return dataclasses.replace(config, text=dataclasses.replace(config.text, num_hidden_layers=text),
                               vision=dataclasses.replace(config.vision, num_hidden_layers=vision))


def unrolled_flops(builder: Callable, config: ModelConfig, shape, mesh: Mesh,
                   flops_of: Callable[[object], float]) -> list[float]:
    """Per program of `builder(config, shape, mesh)`: the FLOPs its unrolled form has, from 1- and 2-layer compiles
    (`flops_of(program)` compiles one and reads its count)."""
    unrolled = dataclasses.replace(shape, scan_layers=False, unroll_micro_batches=True)
    counts = {}
    for text, vision in VARIANTS:
        counts[text, vision] = [flops_of(p) for p in builder(with_layers(config, text, vision), unrolled, mesh)]
    lengths = {len(c) for c in counts.values()}
    if len(lengths) != 1:
        raise RuntimeError("the job's programs differ with the layer count; cannot extrapolate their FLOPs")
    lt, lv = config.text.num_hidden_layers, config.vision.num_hidden_layers
    return [base + (lt - 1) * (text2 - base) + (lv - 1) * (vision2 - base)
            for base, text2, vision2 in zip(counts[1, 1], counts[2, 1], counts[1, 2])]
