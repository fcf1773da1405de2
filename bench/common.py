"""Shared benchmark helpers: timing (warm-up excluded, median of repeats), machine description, JSON output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Any, Callable


def time_call(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 5) -> list[float]:
    """Seconds per call for `repeats` calls after `warmup` untimed calls; `fn` must block until done."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def machine() -> dict[str, Any]:
    import jax

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()][:2]}


def emit(name: str, value: float, **raw: Any) -> None:
    """Print the one-line JSON result last, as every benchmark must."""
    print(json.dumps({"bench": name, "value": round(float(value), 4), **raw}), flush=True)


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, RssAnon, RssFile)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so a peak measures one phase only; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
