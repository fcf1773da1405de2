"""Compile one program for the target and read what XLA says it needs per device; print and summarise."""
from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from typing import Any

import jax

from cogstream_jax.compile_log import CompileLog
from cogstream_jax.compilecheck.hardware import Target
from cogstream_jax.compilecheck.jobs import Program
from cogstream_jax.compiled_store import program_hash


@dataclasses.dataclass
class ProgramReport:
    name: str  # the jitted function's name, as a real run's compile log shows it
    label: str
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    code_bytes: int
    flops_per_chip: float
    examples_per_step: int
    compile_s: float
    executable: Any = dataclasses.field(default=None, repr=False)
    error: str | None = None  # XLA refused to compile (out of memory): its message; figures are a lower bound
    flops_method: str = "compiled"  # or "layer extrapolation" (compilecheck/flops.py: scanned layers)
    host_bytes: int = 0  # the program's buffers in the host's memory (`--remat offload`'s layer inputs), not in HBM
    program_sha256: str | None = None  # `compiled_store.program_hash` of its lowering: a run takes it by this

    @property
    def per_chip_bytes(self) -> int:
        """Peak live bytes per device: arguments + outputs (minus donated buffers reused) + temporaries + code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    def as_json(self) -> dict:
        extra = {"error": self.error} if self.error else {}
        return {**extra, "name": self.name, "label": self.label, "per_chip_bytes": self.per_chip_bytes,
                "argument_bytes": self.argument_bytes, "temp_bytes": self.temp_bytes,
                "output_bytes": self.output_bytes, "host_bytes": self.host_bytes, "flops_per_chip": self.flops_per_chip,
                "flops_method": self.flops_method, "examples_per_step": self.examples_per_step,
                "compile_s": round(self.compile_s, 2)}


@contextlib.contextmanager
def no_persistent_cache():
    """Compile-only executables cannot be read back from JAX's persistent cache (the client cannot load them), so
    writing them there only costs disk; and an executable read back from it is not one to serialise (on CPU it
    comes back without its code): off while compile-check compiles. JAX decides once per process whether it uses
    the cache, so the decision is reset on the way in and out (a process that used it before, a test's, would
    otherwise go on reading it)."""
    from cogstream_jax.persistent_cache import configured

    with configured(jax_enable_compilation_cache=False):
        yield


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_REQUIRED = re.compile(r"required[^(]*\((\d+(?:\.\d+)?)([KMGT]?)\)|Used (\d+(?:\.\d+)?)([KMGT]?) of")


#: XLA's TPU compiler may turn an FSDP all-gather or reduce-scatter beside a matmul into a loop over the shards
#: (windowed einsum: 33 loops in one 7B decoder layer's stage-2 gradient at fsdp=8, none at fsdp=4); its cost
#: analysis then counts each such matmul once instead of once per shard (17.9 instead of 23.4 TFLOP for that
#: layer). Compiles that only count FLOPs turn it off; memory figures always come from the program as it runs.
TPU_FLOP_COUNT_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                          "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def flop_count_options(platform: str) -> dict | None:
    return dict(TPU_FLOP_COUNT_OPTIONS) if platform == "tpu" else None


def flop_count(program: Program, platform: str = "cpu") -> tuple[float, bool]:
    """(FLOPs, whether loops remain) from a compile of `program` without XLA's loops over shards (TPU)."""
    executable = program.lower().compile(compiler_options=flop_count_options(platform))
    return _flops(executable), has_while_loops(executable)


def program_flops(program: Program, platform: str = "cpu") -> float:
    """Compile `program` only to read its FLOP count (without XLA's loops over shards on TPU)."""
    return flop_count(program, platform)[0]


def has_while_loops(executable) -> bool:
    return executable is not None and "while(" in executable.as_text()


def required_bytes(message: str) -> int:
    """The bytes an out-of-memory compile error says the program needs (0 if it does not say)."""
    match = _REQUIRED.search(message)
    if not match:
        return 0
    value, unit = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
    return int(float(value) * _UNITS[unit])


def compile_program(program: Program) -> ProgramReport:
    """Lower and compile `program` (timed), then read its memory and cost analyses. A compile that XLA refuses
    for lack of device memory (TPU) becomes a report of what the error says is needed."""
    start = time.perf_counter()
    with CompileLog() as log:
        lowered = program.lower()
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            compiled = None
            message = str(e).strip().splitlines()[0]
    seconds = time.perf_counter() - start
    name = log.programs[-1].name if log.programs else "?"
    if compiled is None:
        return ProgramReport(name, program.label, 0, 0, required_bytes(message), 0, 0, 0.0,
                             program.examples_per_step, seconds, error=message)
    mem = compiled.memory_analysis()
    return ProgramReport(name, program.label, int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
                         int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes),
                         int(getattr(mem, "generated_code_size_in_bytes", 0) or 0), _flops(compiled),
                         program.examples_per_step, seconds, compiled, host_bytes=_host_bytes(mem),
                         program_sha256=program_hash(lowered))


def _host_bytes(mem) -> int:
    parts = ("host_argument_size_in_bytes", "host_output_size_in_bytes", "host_temp_size_in_bytes")
    return sum(int(getattr(mem, k, 0) or 0) for k in parts) - int(getattr(mem, "host_alias_size_in_bytes", 0) or 0)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def describe(report: ProgramReport, target: Target) -> str:
    hbm = target.generation.hbm_bytes
    if report.error:
        return f"{report.name} ({report.label}): XLA refused to compile it: {report.error}"
    return (f"{report.name} ({report.label}): {gib(report.per_chip_bytes)} per device "
            f"({100 * report.per_chip_bytes / hbm:.1f}% of {gib(hbm)} HBM) = args {gib(report.argument_bytes)} + "
            f"temps {gib(report.temp_bytes)} + outputs {gib(report.output_bytes - report.alias_bytes)}"
            f"{f' (and {gib(report.host_bytes)} in host memory)' if report.host_bytes else ''}; "
            f"{report.flops_per_chip / 1e12:.3f} TFLOP per device per call ({report.examples_per_step} "
            f"example(s)); compiled in {report.compile_s:.1f} s")


def summary(job: str, target: Target, mesh_shape: dict, reports: list[ProgramReport], compile_s: float) -> dict:
    largest = max((r.per_chip_bytes for r in reports), default=0)
    hbm = target.generation.hbm_bytes
    fits = largest <= hbm and not any(r.error for r in reports)
    return {"job": job, "topology": target.name, "chips": target.chips, "devices": target.devices,
            "device": target.generation.device_is, "mesh": mesh_shape, "programs": [r.as_json() for r in reports],
            "per_chip_bytes": largest, "hbm_bytes": hbm, "fits": fits, "compile_s": round(compile_s, 2)}
