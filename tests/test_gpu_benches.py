"""The GPU check's scripts and compile-check start on the lent GPU machines' image, which has the project's code on
PYTHONPATH but not all of its dependencies: no grain, PyAV or decord there (device KINDS.md's package list). Code
whose imports reach one of them fails before measuring anything, as `bench/gpu_stage2.py` once did through the
grain pipelines. Here each script's whole import graph, and every program compile-check builds, load with those
three modules made unimportable."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSENT_ON_GPU_IMAGE = ("grain", "av", "decord")
BLOCK = """
import sys
for name in {absent!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
"""
RUN = BLOCK + """
import runpy
sys.argv = [{script!r}, "--help"]
runpy.run_path({script!r}, run_name="__main__")
"""
# every job's programs, lowered (what compile-check imports only as it builds them); 136 frames: event scoring too
LOWER_JOBS = BLOCK + """
import jax
from cogstream_jax.compilecheck import jobs
from cogstream_jax.config import tiny
from cogstream_jax.sharding import make_mesh

mesh = make_mesh("1,1,1", jax.devices()[:1])
shape = jobs.JobShape(frames=136, grid=(2, 2), kept=136, tokens=512, answer_tokens=32, global_batch_size=1,
                      max_length=512, max_new_tokens=8)
names = [p.lower() and job for job in jobs.JOBS for p in jobs.BUILDERS[job](tiny(), shape, mesh)]
print("lowered", len(names))
"""


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("script", ["bench/gpu_attention.py", "bench/gpu_7b.py", "bench/gpu_stage2.py",
                                    "bench/train_mfu.py"])
def test_gpu_bench_imports_without_packages_the_gpu_image_lacks(script):
    out = _run(RUN.format(absent=ABSENT_ON_GPU_IMAGE, script=script))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout


def test_compile_check_builds_every_job_without_packages_the_gpu_image_lacks():
    out = _run(LOWER_JOBS.format(absent=ABSENT_ON_GPU_IMAGE))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lowered 8" in out.stdout  # stage 1: 1; stage 2: vision chunk, gradient, event scoring; eval: 4
