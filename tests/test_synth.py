"""Synthetic generator: real decodable MP4 segments, output that passes the validator, all 11 capabilities,
correct COI/relevance/Event_Time, determinism for a seed (byte for byte, in any process state: the bundled
sample regenerates exactly, also after the heap was dirtied), the long low-resolution stream, and the CLI."""
from __future__ import annotations

import ctypes
from pathlib import Path

import av
import numpy as np
import pytest

from cogstream_jax.data.dataset import validate_dataset
from cogstream_jax.data.records import CAPABILITIES
from cogstream_jax.data.synth import main, sample_dataset_dir


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "ds"
    assert main(["--output_dir", str(root), "--videos", "2", "--seed", "7", "--chains", "2"]) == 0
    return root


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_generated_output_passes_validator_with_all_capabilities(generated):
    ds = validate_dataset(generated)
    assert ds.warnings == ()
    labels = {label for v in ds.videos for c in v.chains for label in c.labels}
    assert labels == set(CAPABILITIES)


def test_qa_fields_are_consistent(generated):
    for video in validate_dataset(generated).videos:
        ends = []
        for path in video.segments:
            with av.open(str(path)) as c:
                ends.append((ends[-1] if ends else 0.0) + c.duration / 1e6)
        for chain, segs in zip(video.chains, video.segment_of_qa):
            for qa, seg in zip(chain.qas, segs):
                assert qa.event_time == qa.time == pytest.approx(ends[seg], abs=0.01)
                assert [i for i, r in enumerate(qa.relevance) if r] == sorted(qa.coi)
                assert qa.is_visual == (not qa.question.startswith("Do you remember"))
            assert set(segs) == set(range(len(video.segments)))  # every segment has a QA


def test_segments_are_real_videos_with_moving_shapes(generated):
    frames = decode(next((generated / "event_segments").glob("*/*_segment_1.mp4")))
    assert frames.shape[1:] == (64, 96, 3) and len(frames) >= 40
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).max() > 50  # shapes moved


def test_deterministic_for_a_seed(generated, tmp_path):
    again = tmp_path / "again"
    assert main(["--output-dir", str(again), "--videos", "2", "--seed", "7", "--chains", "2"]) == 0
    for path in (generated / "QA_Dataset").iterdir():
        assert path.read_text() == (again / "QA_Dataset" / path.name).read_text()
        assert (generated / "VQA_Dataset" / path.name).read_text() == (again / "VQA_Dataset" / path.name).read_text()
    for seg in (generated / "event_segments").glob("*/*.mp4"):  # byte for byte, whatever the machine load
        assert seg.read_bytes() == (again / seg.relative_to(generated)).read_bytes(), seg.name
    other = tmp_path / "other"
    main(["--output_dir", str(other), "--videos", "1", "--seed", "8"])
    assert (other / "QA_Dataset" / "synth_8_000.json").read_text() != (generated / "QA_Dataset" / "synth_7_000.json").read_text()


# The README's command for the bundled sample (cogstream_jax/assets/sample/README.md).
SAMPLE_ARGS = ["--videos", "2", "--seed", "0", "--long_videos", "1", "--chains", "2"]


def dirty_freed_heap(blocks: int = 2000, max_size: int = 70_000, seed: int = 0) -> None:
    """Leave freed heap memory full of 0xFF bytes, as other work in a long process leaves it full of leftovers.

    A later allocation that reuses it starts with these bytes wherever its owner does not write. Before
    mp4_writer.X264_OPTIONS, x264's AVX-512 macroblock-tree code read such bytes (0xFFFF cost words and (-1, -1)
    motion vectors count as real references) and the same seed gave other MP4 bytes after this on every run.
    """
    libc = ctypes.CDLL(None)  # a private handle: the signatures set here stay on it
    malloc, free = libc.malloc, libc.free
    malloc.restype, malloc.argtypes, free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    sizes = [int(n) for n in np.random.default_rng(seed).integers(64, max_size, size=blocks)]
    pointers = [malloc(n) for n in sizes]
    assert all(pointers)
    for pointer, n in zip(pointers, sizes):
        ctypes.memset(pointer, 0xFF, n)
    for pointer in pointers:
        free(pointer)


def assert_same_files(made: Path, committed: Path) -> None:
    files = {p.relative_to(committed) for p in committed.rglob("*") if p.is_file() and p.name != "README.md"}
    assert {p.relative_to(made) for p in made.rglob("*") if p.is_file()} == files
    differ = sorted(str(f) for f in files if (made / f).read_bytes() != (committed / f).read_bytes())
    assert not differ, (f"regenerated files differ from the committed sample: {differ} (a deliberate generator or "
                        "encoder change needs the sample regenerated with the command in its README.md)")


def test_bundled_sample_regenerates_byte_for_byte(tmp_path):
    assert main(["--output_dir", str(tmp_path / "sample"), *SAMPLE_ARGS]) == 0
    assert_same_files(tmp_path / "sample", sample_dataset_dir())


def test_bundled_sample_regenerates_byte_for_byte_after_the_heap_was_dirtied(tmp_path):
    dirty_freed_heap()
    assert main(["--output_dir", str(tmp_path / "sample"), *SAMPLE_ARGS]) == 0
    assert_same_files(tmp_path / "sample", sample_dataset_dir())


def test_bundled_sample_is_small_and_has_a_long_low_res_stream():
    root = sample_dataset_dir()
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total < 2_000_000
    long_video = validate_dataset(root).video("synth_0_long_00")
    assert long_video.chains[0].qas[-1].event_time == 150.0
    with av.open(str(long_video.segments[0])) as c:
        stream = c.streams.video[0]
        assert (stream.height, stream.width) == (56, 56) and float(stream.average_rate) == 2.0
    labels = {label for v in validate_dataset(root).videos for c in v.chains for label in c.labels}
    assert labels == set(CAPABILITIES)


def test_cli_rejects_bad_counts(capsys):
    assert main(["--output_dir", "/tmp/unused-synth", "--videos", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --videos") and "Traceback" not in err and err.count("\n") == 1
