"""compile-check's saved executables serve a training run (`train-stage1/2 --compiled_dir`): the gradient programs
of the tiny stage-1 and stage-2 jobs, built and compiled by compile-check's own code (`jobs.stage1_programs` /
`jobs.stage2_programs`, `report.compile_program`, `compiled_store.save`) for this host's CPU, are taken by a run
with the same flags instead of compiling, and train the same numbers; a program of other flags is not taken; a
folder that is not compile-check's is a one-line error."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import jax
import pytest

from multihost_helpers import REPO, SAMPLE, TIMEOUT_S, clean_env, metrics, run_single

BUCKETS = (256, 640)
ARGS = ["--model_path", "tiny", "--video_dir", str(SAMPLE / "event_segments"), "--query_dir",
        str(SAMPLE / "QA_Dataset"), "--num_epochs", "1", "--dtype", "float32", "--no_progress", "--seed", "0",
        "--global_batch_qas", "1", "--max_steps", "3", "--logging_steps", "1", "--bucket_scan_qas", "3",
        "--token_buckets", ",".join(map(str, BUCKETS))]


def compile_gradients(buckets, job: str = "stage2", **flags) -> list:
    """The tiny job's gradient per token bucket (stage 2) or padded length (stage 1), as compile-check compiles
    them, on one CPU device (the run's mesh)."""
    from cogstream_jax.compilecheck import jobs, report
    from cogstream_jax.config import tiny
    from cogstream_jax.sharding import make_mesh

    if job == "stage2":
        shape = jobs.JobShape(dtype="float32", frames=4, grid=(4, 4), kept=16, tokens=buckets[-1], answer_tokens=64,
                              token_buckets=buckets, seed=0, **flags)
    else:
        shape = jobs.JobShape(dtype="float32", global_batch_size=8, max_length=S1_MAX_LENGTH, length_buckets=buckets,
                              seed=0, **flags)
    mesh = make_mesh("1,1,1", jax.devices()[:1])
    programs = [p for p in jobs.BUILDERS[job](tiny(), shape, mesh) if p.trains]
    # an earlier test of this process may hold the same program in JAX's in-memory cache, read back from the
    # suite's persistent cache (which serialises without its code on CPU): compile it afresh, as compile-check does
    jax.clear_caches()
    with report.no_persistent_cache():
        return [report.compile_program(p) for p in programs]


@pytest.mark.slow
def test_a_run_takes_its_gradient_programs_from_compile_check(tmp_path):
    from cogstream_jax import compiled_store

    # the run's flags, and a program of other flags: the same arguments, another computation (never taken)
    compiled_store.save(str(tmp_path / "compiled"), compile_gradients(BUCKETS) + compile_gradients(
        BUCKETS[:1], lora_dropout=0.2))
    index = json.loads((tmp_path / "compiled" / "index.json").read_text())
    assert [p["name"] for p in index["programs"]] == ["grad"] * 3 and index["jax"] == jax.__version__
    err = run_single("train.stage2", [*ARGS, "--compiled_dir", str(tmp_path / "compiled")], tmp_path / "ahead",
                     devices=1, persistent_cache=False)
    assert "2 gradient programs (token buckets [256, 640], 64 answer positions): 2 taken from --compiled_dir " \
           "(of 3 there), 0 compiled" in err, err[-3000:]
    run_single("train.stage2", ARGS, tmp_path / "plain", devices=1, persistent_cache=False)
    ahead, plain = metrics(tmp_path / "ahead"), metrics(tmp_path / "plain")
    assert [m["gradient_programs_compiled"] for m in ahead] == [0, 0, 0]  # the run compiled no gradient
    assert [m["gradient_programs_compiled"] for m in plain] == [2, 2, 2]
    for a, p in zip(ahead, plain, strict=True):
        assert a["loss"] == pytest.approx(p["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(p["grad_norm"])


S1_MAX_LENGTH = 576
S1_ARGS = ["--model_path", "tiny", "--QA_path", str(SAMPLE), "--global_batch_size", "8", "--max_length",
           str(S1_MAX_LENGTH), "--num_train_epochs", "1", "--max_steps", "2", "--dtype", "float32", "--no_progress",
           "--seed", "0"]


@pytest.mark.slow
def test_a_stage1_run_takes_its_gradient_programs_from_compile_check(tmp_path):
    from cogstream_jax import compiled_store
    from cogstream_jax.compilecheck.cli import stage1_lengths
    from cogstream_jax.training.stage1_geometry import GRAD_PROGRAM

    lengths = stage1_lengths("all", S1_MAX_LENGTH)
    assert lengths == (512, 640)  # the lengths a --max_length 576 run pads its batches to
    compiled_store.save(str(tmp_path / "compiled"), compile_gradients(lengths, "stage1") + compile_gradients(
        lengths[-1:], "stage1", lora_dropout=0.2))
    index = json.loads((tmp_path / "compiled" / "index.json").read_text())
    assert [p["name"] for p in index["programs"]] == [GRAD_PROGRAM] * 3
    err = run_single("train.stage1", [*S1_ARGS, "--compiled_dir", str(tmp_path / "compiled")], tmp_path / "ahead",
                     devices=1, persistent_cache=False)
    summary = [line for line in err.splitlines() if line.startswith("stage 1: gradient programs: ")]
    assert len(summary) == 1 and summary[0].endswith("from --compiled_dir (of 3 there), 0 compiled"), err[-3000:]
    assert not summary[0].startswith("stage 1: gradient programs: 0 taken")
    run_single("train.stage1", S1_ARGS, tmp_path / "plain", devices=1, persistent_cache=False)
    ahead, plain = metrics(tmp_path / "ahead"), metrics(tmp_path / "plain")
    assert len(ahead) == len(plain) == 2
    for a, p in zip(ahead, plain, strict=True):
        assert a["loss"] == pytest.approx(p["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(p["grad_norm"])


SAVE_READ_BACK = """
import sys
import jax
sys.path.insert(0, "tests")
from test_compiled_dir import S1_MAX_LENGTH
from cogstream_jax import compiled_store
from cogstream_jax.compilecheck import jobs, report
from cogstream_jax.config import tiny
from cogstream_jax.sharding import make_mesh

jax.config.update("jax_compilation_cache_dir", sys.argv[2])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
shape = jobs.JobShape(dtype="float32", global_batch_size=8, max_length=S1_MAX_LENGTH, length_buckets=(512, 640),
                      seed=0)
programs = jobs.stage1_programs(tiny(), shape, make_mesh("1,1,1", jax.devices()[:1]))
for p in programs:
    p.lower().compile()  # into the persistent cache
jax.clear_caches()
compiled_store.save(sys.argv[1], [report.compile_program(p) for p in programs])  # read back: without code on CPU
"""


@pytest.mark.slow
def test_a_saved_program_that_loads_but_cannot_run_is_a_one_line_error(tmp_path):
    """An executable this runtime loads but cannot run: here one that compile-check's code read back from JAX's
    persistent cache, which serialises without its code on CPU with our pinned JAX (compile-check itself compiles
    with the cache off). The run stops at its first update with one line naming the file, exit 2."""
    env = clean_env(1)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", SAVE_READ_BACK, str(tmp_path / "compiled"), str(tmp_path / "cache")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([sys.executable, "-m", "train.stage1", *S1_ARGS, "--compiled_dir", str(tmp_path / "compiled"),
                           "--output_dir", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert re.match(r"error: --compiled_dir: 0[01]_stage1_grad\.pkl fails at its first run here \(", last) and \
        "Traceback" not in done.stderr, done.stderr[-3000:]


def test_a_folder_that_is_not_compile_checks_is_a_one_line_error(tmp_path, capsys):
    from cogstream_jax import compiled_store
    from cogstream_jax.errors import ConfigError
    from cogstream_jax.sharding import make_mesh

    mesh = make_mesh("1,1,1", jax.devices()[:1])
    here = ["cpu:cpu"]

    def index(programs, **extra):
        (tmp_path / "index.json").write_text(json.dumps({"jax": jax.__version__,
                                                        "compiler_flags": compiled_store.compiler_flags(),
                                                        "programs": programs, **extra}))

    with pytest.raises(ConfigError, match=r"--compiled_dir .*: no index.json \(a folder written by compile-check"):
        compiled_store.load(str(tmp_path), "grad", mesh)
    index([], jax="0.0.1")
    with pytest.raises(ConfigError, match="compiled with JAX 0.0.1, this is JAX"):
        compiled_store.load(str(tmp_path), "grad", mesh)
    index([], compiler_flags={"XLA_FLAGS": "--xla_gpu_deterministic_ops=true", "LIBTPU_INIT_ARGS": ""})
    with pytest.raises(ConfigError, match="compiled with other compiler settings"):
        compiled_store.load(str(tmp_path), "grad", mesh)
    index([{"name": "grad", "program_sha256": "ab", "devices": here}])  # no file
    with pytest.raises(ConfigError, match="is not compile-check's index"):
        compiled_store.load(str(tmp_path), "grad", mesh)
    index([{"name": "grad", "file": "00_grad.pkl", "program_sha256": "ab", "devices": here}])
    (tmp_path / "00_grad.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="00_grad.pkl cannot be loaded here"):
        compiled_store.load(str(tmp_path), "grad", mesh)
    # a program for other chips (or another device count) is not taken, with a note
    index([{"name": "grad", "file": "00_grad.pkl", "program_sha256": "ab", "devices": ["tpu:TPU v5 lite"] * 4}])
    assert compiled_store.load(str(tmp_path), "grad", mesh) == {}
    assert "runs on 4 x ['tpu:TPU v5 lite'], this run's mesh on 1 x ['cpu:cpu']: not taken" in capsys.readouterr().err
    # the same kind of device with another id (another device order, or another process layout) neither
    index([{"name": "grad", "file": "00_grad.pkl", "program_sha256": "ab", "devices": here, "device_ids": [5]}])
    assert compiled_store.load(str(tmp_path), "grad", mesh) == {}
    assert "00_grad.pkl was compiled for devices [5] in this order, this run's mesh has [0]: not taken" in (
        capsys.readouterr().err)
    index([{"name": "grad", "file": "00_grad.pkl", "program_sha256": "ab", "devices": here, "device_ids": 5}])
    with pytest.raises(ConfigError, match="is not compile-check's index"):
        compiled_store.load(str(tmp_path), "grad", mesh)
    (tmp_path / "index.json").write_text("[]")
    with pytest.raises(ConfigError, match="is not compile-check's index"):
        compiled_store.load(str(tmp_path), "grad", mesh)
