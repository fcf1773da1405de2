"""The GPU check's scripts start on the lent GPU machines' image, which has the project's code on PYTHONPATH but
not all of its dependencies: no grain, PyAV or decord there (device KINDS.md's package list). A script whose
imports reach one of them fails before measuring anything, as `bench/gpu_stage2.py` once did through the grain
pipelines. Here each script's whole import graph loads with those three modules made unimportable."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSENT_ON_GPU_IMAGE = ("grain", "av", "decord")
RUN = """
import runpy, sys
for name in {absent!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
sys.argv = [{script!r}, "--help"]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.parametrize("script", ["bench/gpu_attention.py", "bench/gpu_7b.py", "bench/gpu_stage2.py",
                                    "bench/train_mfu.py"])
def test_gpu_bench_imports_without_packages_the_gpu_image_lacks(script):
    code = RUN.format(absent=ABSENT_ON_GPU_IMAGE, script=script)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout
