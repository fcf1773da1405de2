"""One `eval` process on every local device (inference/parallel.py): streams on 8 fake CPU devices write the same
result files as one stream on one device, each video once; a run killed with SIGKILL and rerun finishes without
redoing the videos it had finished; a weight copy sharded over a device group gives the same answers."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import pytest

from cogstream_jax.data.synth import sample_dataset_dir
from cogstream_jax.errors import UserError
from cogstream_jax.inference.parallel import devices_per_stream, stream_count
from evaluate.answer_generate import main
from multihost_helpers import REPO, TIMEOUT_S, clean_env

SHORT = ("synth_0_000", "synth_0_001")
FAST = ["--max_questions", "2", "--max_new_tokens", "4", "--no_progress", "--greedy"]


def _dataset(root, copies: int = 1):
    """The two short sample videos, `copies` times under distinct names (video folder and QA file renamed)."""
    sample = sample_dataset_dir()
    (root / "QA").mkdir(parents=True)
    (root / "videos").mkdir()
    names = []
    for k in range(copies):
        for video in SHORT:
            name = video if copies == 1 else f"{video}_copy{k}"
            folder = root / "videos" / name
            folder.mkdir()
            for clip in (sample / "event_segments" / video).iterdir():
                shutil.copy(clip, folder / clip.name.replace(video, name))
            shutil.copy(sample / "QA_Dataset" / f"{video}.json", root / "QA" / f"{name}.json")
            names.append(name)
    return root / "videos", root / "QA", names


def _args(videos, queries, save_dir, *extra):
    return ["--model_path", "tiny", "--video_dir", str(videos), "--query_dir", str(queries),
            "--save_dir", str(save_dir), *FAST, *extra]


@pytest.mark.slow
def test_streams_on_eight_devices_equal_one_device(tmp_path, capsys):
    assert len(jax.local_devices()) == 8
    videos, queries, names = _dataset(tmp_path / "data")
    assert main(_args(videos, queries, tmp_path / "one", "--streams", "1")) == 0
    assert main(_args(videos, queries, tmp_path / "all", "--streams", "8")) == 0
    err = capsys.readouterr().err
    assert "eval: 2 stream(s) at once, 1 device(s) each" in err  # one per video: 2 of the 8 devices
    assert f"done: {len(names)} videos (0 already finished)" in err
    for name in names:
        one = (tmp_path / "one" / f"{name}.json").read_bytes()
        assert one == (tmp_path / "all" / f"{name}.json").read_bytes()
        assert len(json.loads(one)["Data"]) == 1  # the stream was evaluated once
    # one copy of the weights fsdp-sharded over 4 devices answers the same
    assert main(_args(videos, queries, tmp_path / "sharded", "--streams", "1", "--devices_per_stream", "4")) == 0
    assert "eval: 1 stream(s) at once, 4 device(s) each" in capsys.readouterr().err
    for name in names:
        assert (tmp_path / "one" / f"{name}.json").read_bytes() == (tmp_path / "sharded" / f"{name}.json").read_bytes()


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_finished_videos(tmp_path):
    videos, queries, names = _dataset(tmp_path / "data", copies=3)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "evaluate.answer_generate", *_args(videos, queries, out, "--streams", "2")]
    proc = subprocess.Popen(argv, env=clean_env(8), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not list(out.glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    assert 1 <= len(finished) < len(names)
    done = subprocess.run(argv, env=clean_env(8), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"({len(finished)} already finished)" in done.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json") if p.name in finished} == finished
    assert sorted(p.stem for p in out.glob("*.json")) == sorted(names)


def test_device_grouping_rules():
    assert devices_per_stream("auto", 8, 10 * 2**30, None) == 1  # no memory figure (CPU): one device each
    assert devices_per_stream("auto", 8, 15 * 2**30, 16 * 2**30) == 2  # 7B bf16 on 16 GiB chips
    assert devices_per_stream("auto", 8, 15 * 2**30, 141 * 2**30) == 1
    assert devices_per_stream(4, 8, 0, None) == 4
    assert stream_count("auto", 8, "cpu") == 1 and stream_count("auto", 4, "gpu") == 4
    for bad in (lambda: devices_per_stream(3, 8, 0, None), lambda: devices_per_stream("auto", 2, 99 * 2**30, 2**30),
                lambda: stream_count(9, 8, "gpu")):
        with pytest.raises(UserError):
            bad()


def test_weights_load_straight_onto_their_device_group(tmp_path, monkeypatch):
    """A copy sharded over a group is read onto that group's mesh tensor by tensor: the whole model never sits on
    one device first (a 7B bf16 model does not fit one 16 GiB chip), and the groups are sized from the config."""
    from flax import nnx

    from cogstream_jax.compile_log import tree_bytes
    from cogstream_jax.inference.loading import weight_bytes
    from cogstream_jax.inference.session import StreamingSession
    from cogstream_jax.weights import loader
    from weights_helpers import torch_model, write_native

    folder = str(write_native(torch_model(), tmp_path / "native"))
    meshes, make_placer = [], loader.make_placer
    monkeypatch.setattr(loader, "make_placer",
                        lambda dtype, mesh, *a: meshes.append(mesh) or make_placer(dtype, mesh, *a))
    group = tuple(jax.local_devices()[4:])
    session = StreamingSession.from_pretrained(folder, devices=group)
    assert [tuple(m.devices.flat) for m in meshes] == [group]
    arrays = [v[...] for _, v in nnx.to_flat_state(nnx.state(session.model))]
    assert arrays and all(a.sharding.device_set == set(group) for a in arrays)
    assert any(len(a.sharding.shard_shape(a.shape)) and a.sharding.shard_shape(a.shape) != a.shape for a in arrays)
    assert weight_bytes(folder) == tree_bytes(arrays)  # what --devices_per_stream auto weighs, before loading
