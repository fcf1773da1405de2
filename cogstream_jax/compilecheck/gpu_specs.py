"""GPU device descriptions for compile-only CUDA topologies, written from NVIDIA's published figures.

XLA's GPU compiler needs a `stream_executor.GpuTargetConfigProto` (text format) when no GPU is present; these
are ours, one row of data per GPU, rendered by `target_config_text`.
"""
from __future__ import annotations

import dataclasses

KIB, MIB, GIB = 2**10, 2**20, 2**30


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    description: str  # what `device_kind` reports
    compute_capability: tuple[int, int]
    sm_count: int
    fp32_cores_per_sm: int
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int
    l2_cache_bytes: int
    boost_clock_ghz: float
    memory_bandwidth: int  # bytes/s
    memory_bytes: int


GPU_SPECS: dict[str, GpuSpec] = {
    "a100": GpuSpec("NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 164 * KIB, 163 * KIB, 40 * MIB, 1.41,
                    2_039_000_000_000, 80 * GIB),
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 228 * KIB, 227 * KIB, 50 * MIB, 1.98,
                    3_350_000_000_000, 80 * GIB),
    "h200": GpuSpec("NVIDIA H200", (9, 0), 132, 128, 228 * KIB, 227 * KIB, 50 * MIB, 1.98,
                    4_800_000_000_000, 141 * 10**9),
}


def target_config_text(spec: GpuSpec) -> str:
    """The GpuTargetConfigProto text XLA compiles against."""
    major, minor = spec.compute_capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {spec.shared_memory_per_sm}
  threads_per_core_limit: 2048
  core_count: {spec.sm_count}
  fpus_per_core: {spec.fp32_cores_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {spec.memory_bandwidth}
  l2_cache_size: {spec.l2_cache_bytes}
  clock_rate_ghz: {spec.boost_clock_ghz}
  device_memory_size: {spec.memory_bytes}
  shared_memory_per_block_optin: {spec.shared_memory_per_block_optin}
  cuda_compute_capability {{
    major: {major}
    minor: {minor}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 8
}}
device_description_str: "{spec.description}"
"""
