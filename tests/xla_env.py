"""XLA flags of every JAX process the tests start (pytest itself and the CLIs they launch).

Besides the fake CPU device count, tests compile with LLVM's optimisation level 0 and XLA's classic CPU runtime:
the tiny models' programs are cheap to run and costly to compile, and both settings cut about a quarter of the
suite's CPU time (measured on test_train_sharding: 85 -> 62 CPU seconds). Every comparison in the suite is made
within one run (ours vs torch, sharded vs single device, one process vs two), never against numbers stored from
another runtime, so the settings cannot hide a difference; users' runs keep XLA's defaults."""
from __future__ import annotations

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_thunk_runtime=false"


def xla_flags(devices: int) -> str:
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
