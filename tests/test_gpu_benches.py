"""The GPU check's scripts and compile-check start on the lent GPU machines' image, which has the project's code on
PYTHONPATH but not all of its dependencies: no grain, PyAV or decord there (device KINDS.md's package list). Code
whose imports reach one of them fails before measuring anything, as `bench/gpu_stage2.py` once did through the
grain pipelines. Here the GPU check's CPU smoke stages (`SMOKE=1 bash bench/gpu_check.sh`: tiny shapes, the
same code paths) run, and every program compile-check builds is lowered, with those three modules made
unimportable; `bench/train_mfu.py` (not part of the check) runs its CPU smoke too."""
from __future__ import annotations

import json
import os
import re
import shlex
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
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
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
lowered = 0
for job in jobs.JOBS:
    for program in jobs.BUILDERS[job](tiny(), shape, mesh):
        program.lower()
        lowered += 1
print("lowered", lowered)
"""


def _run(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def smoke_stages() -> list[tuple[int, list[str]]]:
    """(seconds, arguments) of `bench/gpu_check.sh`'s SMOKE=1 stages (`stage NAME SECONDS SCRIPT ARGS...`)."""
    text = open(os.path.join(ROOT, "bench", "gpu_check.sh")).read()
    block = re.search(r'if \[ "\$\{SMOKE:-0\}" = 1 \]; then(.*?)\nelse', text, re.S).group(1)
    stages = [shlex.split(line) for line in block.splitlines() if line.strip().startswith("stage ")]
    return [(int(words[2]), words[3:]) for words in stages]


STAGES = smoke_stages() + [(300, ["bench/train_mfu.py", "--config", "tiny", "--rows", "2", "--length", "128"])]


@pytest.mark.parametrize("seconds, argv", STAGES, ids=[os.path.basename(a[0]) for _, a in STAGES])
def test_gpu_check_smoke_stage_runs_without_packages_the_gpu_image_lacks(seconds, argv):
    out = _run(RUN.format(absent=ABSENT_ON_GPU_IMAGE, argv=argv), timeout=seconds)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bench"] == os.path.basename(argv[0])[:-3] and result.get("ok", True) is not False
    if result["bench"] == "gpu_attention":
        assert result["value"] == 0  # failed checks


def test_compile_check_builds_every_job_without_packages_the_gpu_image_lacks():
    out = _run(LOWER_JOBS.format(absent=ABSENT_ON_GPU_IMAGE))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lowered 8" in out.stdout  # stage 1: 1; stage 2: vision chunk, gradient, event scoring; eval: 4
