"""Accelerators compile-check can target, as data: the names users rent them by, libtpu topology strings,
per-device HBM and peak bf16 FLOP/s (the vendors' published figures), and what one JAX device is.

TPU slices are named by accelerator type (`v5p-8`, `v5e-16`, ...). For v4 and v5p the number counts
TensorCores (two per chip), for v5e and v6e it counts chips. GPU hosts are named `<gpu>-<count>`.
"""
from __future__ import annotations

import dataclasses

from cogstream_jax.errors import ConfigError

GB = 10**9
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
    """One accelerator generation: the figures of ONE JAX device of it."""

    name: str
    platform: str  # "tpu" | "gpu"
    hbm_bytes: int  # per JAX device
    peak_bf16_flops: float  # per JAX device, dense
    device_is: str  # what one JAX device is, in words
    hbm_note: str = ""


#: published per-chip figures (Cloud TPU system architecture pages; NVIDIA data sheets, dense bf16)
GENERATIONS: dict[str, Generation] = {
    # libtpu 0.0.42's compile-only v4 topology has one device per TensorCore (no megacore): 16 GiB of a
    # chip's 32 GiB and half its 275 TFLOP/s each. (A v4 VM in megacore mode shows one device per chip: not
    # verified here.)
    "v4": Generation("v4", "tpu", 16 * GIB, 137.5e12, "one TensorCore (half a v4 chip; libtpu's compile-only "
                     "v4 topology does not use megacore)"),
    "v5p": Generation("v5p", "tpu", 95 * GIB, 459e12, "one v5p chip (megacore: both TensorCores)"),
    "v5e": Generation("v5e", "tpu", 16 * GIB, 197e12, "one v5e chip (one TensorCore)"),
    "v6e": Generation("v6e", "tpu", 32 * GIB, 918e12, "one v6e (Trillium) chip (one TensorCore)"),
    "a100": Generation("a100", "gpu", 80 * GIB, 312e12, "one A100-SXM4-80GB GPU"),
    "h100": Generation("h100", "gpu", 80 * GIB, 989e12, "one H100-SXM5-80GB GPU"),
    "h200": Generation("h200", "gpu", 141 * GB, 989e12, "one H200-SXM-141GB GPU"),
}

#: chips -> libtpu topology (x,y[,z]) for the 2-D (v5e, v6e) and 3-D (v4, v5p) tori
_TORUS_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_TORUS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}


@dataclasses.dataclass(frozen=True)
class Target:
    """One named slice or host: `devices` JAX devices of `generation`."""

    name: str
    generation: Generation
    chips: int
    devices: int
    topology: str  # libtpu topology string ("v5p:2x2x1") or the GPU topology ("1x1x8")

    @property
    def platform(self) -> str:
        return self.generation.platform


def _tpu_targets() -> dict[str, Target]:
    out = {}
    for gen, counts_cores in (("v4", True), ("v5p", True), ("v5e", False), ("v6e", False)):
        torus = _TORUS_3D if gen in ("v4", "v5p") else _TORUS_2D
        prefix = "v5p" if gen == "v5p" else gen
        for chips, shape in torus.items():
            number = chips * 2 if counts_cores else chips
            devices = chips * 2 if gen == "v4" else chips
            name = f"{gen}-{number}"
            out[name] = Target(name, GENERATIONS[gen], chips, devices, f"{prefix}:{shape}")
    return out


def _gpu_targets() -> dict[str, Target]:
    return {f"{gen}-{n}": Target(f"{gen}-{n}", GENERATIONS[gen], n, n, f"1x1x{n}")
            for gen in ("a100", "h100", "h200") for n in (1, 8)}


TARGETS: dict[str, Target] = {**_tpu_targets(), **_gpu_targets()}


def target(name: str) -> Target:
    """The target for a user-facing name; a one-line error listing the valid names otherwise."""
    key = name.strip().lower().replace("v5litepod", "v5e")
    if key not in TARGETS:
        raise ConfigError(f"--topology {name!r}: unknown accelerator; choose one of {', '.join(TARGETS)}")
    return TARGETS[key]
