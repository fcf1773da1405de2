"""Compile-only devices of a target, on a host that has none: libtpu's topology descriptions for TPU slices and
the jax-cuda12 plugin's for GPU hosts (`jax.experimental.topologies`). JAX itself keeps running on the CPU."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile

import jax

from cogstream_jax.compilecheck.gpu_specs import GPU_SPECS, target_config_text
from cogstream_jax.compilecheck.hardware import Target
from cogstream_jax.errors import ConfigError, first_line

INSTALL_HINT = {"tpu": 'pip install "cogstream-jax[tpu]" (jax[tpu]==0.10.2, i.e. libtpu 0.0.42)',
                "gpu": 'pip install "cogstream-jax[cuda12]" (jax-cuda12-plugin/pjrt 0.10.2; a CUDA 13 build of '
                       'JAX brings jax-cuda13-plugin, which serves too)'}
#: the modules that describe each platform's devices (CUDA 13 builds of JAX, like the lent GPUs' jax 0.11, bring
#: jax_cuda13_plugin)
_PLUGINS = {"tpu": ("libtpu",), "gpu": ("jax_cuda12_plugin", "jax_cuda13_plugin")}


def compile_only_devices(target: Target) -> list[jax.Device]:
    """`target.devices` compile-only devices, in the topology's order."""
    from jax.experimental import topologies

    platform = target.platform
    if all(importlib.util.find_spec(name) is None for name in _PLUGINS[platform]):
        raise ConfigError(f"--topology {target.name}: compiling for {platform.upper()} needs "
                          f"{INSTALL_HINT[platform]}")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server on a non-TPU host
    # compile-only: no chip to guard, other processes may hold libtpu
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        with _quiet_stderr():
            if platform == "tpu":
                desc = topologies.get_topology_desc(topology_name=target.topology, platform="tpu")
            else:
                spec = GPU_SPECS[target.generation.name]
                desc = topologies.get_topology_desc(platform="cuda", topology=target.topology,
                                                    target_config=target_config_text(spec))
    except Exception as e:  # libtpu/plugin errors carry long multi-line traces; keep the first line
        raise ConfigError(f"--topology {target.name}: no compile-only devices for {target.topology} "
                          f"({first_line(e)})") from None
    devices = list(desc.devices)
    if len(devices) != target.devices:
        raise ConfigError(f"--topology {target.name}: expected {target.devices} devices, the topology description "
                          f"has {len(devices)}")
    return devices


@contextlib.contextmanager
def _quiet_stderr():
    """Swallow what libtpu writes to file descriptor 2 while it loads (warnings about the missing TPU host)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
