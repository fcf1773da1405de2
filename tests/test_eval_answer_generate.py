"""evaluate.answer_generate end to end on the bundled synthetic dataset with the tiny random model: valid
official result files, resume without redoing videos, 1 vs 2 processes byte-identical, adapters by role, and
one-line errors for bad input."""
from __future__ import annotations

import json
import shutil

import pytest

from cogstream_jax.adapter_io import save_adapter
from cogstream_jax.config import tiny as tiny_config
from cogstream_jax.data.synth import sample_dataset_dir
from cogstream_jax.inference.evaluation import shard
from cogstream_jax.inference.loading import tiny_model
from cogstream_jax.lora import add_adapter, full_module_spec, language_module_spec
from cogstream_jax.peft_io import save_peft_adapter
from evaluate.answer_generate import main

VIDEOS = ("synth_0_000", "synth_0_001")
FAST = ["--max_questions", "3", "--max_new_tokens", "4", "--no_progress"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The two short sample videos (query dir restricted to them)."""
    root = tmp_path_factory.mktemp("data")
    (root / "QA").mkdir()
    for name in VIDEOS:
        shutil.copy(sample_dataset_dir() / "QA_Dataset" / f"{name}.json", root / "QA" / f"{name}.json")
    return sample_dataset_dir() / "event_segments", root / "QA"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model = tiny_model()
    add_adapter(model, "language_module", language_module_spec(model.config), seed=1)
    add_adapter(model, "full_module", full_module_spec(model.config), seed=2)
    out = {"retrieval": save_adapter(model, "language_module", root / "stage1"),
           "answer": save_adapter(model, "full_module", root / "stage2"),
           "answer_peft": save_peft_adapter(model, "full_module", root / "stage2_peft")}
    from cogstream_jax.model.videollama3 import VideoLlama3
    from flax import nnx

    other = VideoLlama3(tiny_config(vocab_size=152000), rngs=nnx.Rngs(0))
    add_adapter(other, "full_module", full_module_spec(other.config))
    out["other_base"] = save_adapter(other, "full_module", root / "other")
    return out


def _args(dataset, save_dir, *extra):
    video_dir, query_dir = dataset
    return ["--model_path", "tiny", "--video_dir", str(video_dir), "--query_dir", str(query_dir),
            "--save_dir", str(save_dir), *FAST, *extra]


@pytest.mark.slow
def test_end_to_end_valid_files_and_official_adapter_flags(dataset, adapters, tmp_path):
    # official flags in the official (swapped) order, one PEFT folder: roles are detected from content
    assert main(_args(dataset, tmp_path, "--lora_adapter_1_path", str(adapters["answer_peft"]),
                      "--lora_adapter_2_path", str(adapters["retrieval"]))) == 0
    for name in VIDEOS:
        data = json.loads((tmp_path / f"{name}.json").read_text(encoding="utf-8"))
        assert data["video_name"] == name and len(data["Data"]) == 1
        chain = data["Data"][0]
        assert [r["qa_id"] for r in chain] == [0, 1, 2]
        assert set(chain[0]) == {"qa_id", "question", "answer", "prediction", "predicted_coi", "predicted_visual",
                                 "coi"}
        assert chain[0]["predicted_visual"] is True and chain[0]["predicted_coi"] == []
        assert all(len(r["predicted_coi"]) == r["qa_id"] and isinstance(r["coi"], str) for r in chain)
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.slow
def test_resume_and_process_split_are_byte_identical(dataset, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args(dataset, one)) == 0
    # an "interrupted" run: worker 0 of 2 finished its video only; a rerun must skip it
    assert main(_args(dataset, two, "--num_processes", "2", "--process_index", "0")) == 0
    first = two / f"{VIDEOS[0]}.json"
    stamp = first.stat().st_mtime_ns
    # worker 1 decodes single-threaded: the thread count changes no byte either
    assert main(_args(dataset, two, "--num_processes", "2", "--process_index", "1", "--decode_threads", "1")) == 0
    assert main(_args(dataset, two)) == 0
    assert "0 videos (2 already finished)" in capsys.readouterr().err
    assert first.stat().st_mtime_ns == stamp
    for name in VIDEOS:
        assert (one / f"{name}.json").read_bytes() == (two / f"{name}.json").read_bytes()
    # prompt-prefix KV reuse (default) changes no result: the official full prefills give the same files
    full = tmp_path / "full"
    assert main(_args(dataset, full, "--no_reuse_prefix")) == 0
    for name in VIDEOS:
        assert (one / f"{name}.json").read_bytes() == (full / f"{name}.json").read_bytes()
    # a rerun into the same folder with result-changing settings is refused, naming them
    assert main(_args(dataset, one, "--mode", "AC")) == 2
    assert "mode: 'FCC' -> 'AC'" in capsys.readouterr().err
    jobs = [type("J", (), {"name": f"v{i}"})() for i in range(5)]
    parts = [[j.name for j in shard(jobs, i, 3)] for i in range(3)]
    assert sorted(sum(parts, [])) == [f"v{i}" for i in range(5)] and all(parts)


@pytest.mark.parametrize("case, message", [
    ("missing_adapter", "adapter directory does not exist"),
    ("other_base", "made for another base"),
    ("swapped", "did you swap the adapters"),
    ("both_answer", "both adapters look like the answer adapter"),
    ("empty_queries", "holds no .json QA files"),
    ("bad_threads", "--decode_threads: expected a positive integer"),
    ("no_questions", "--max_questions must be >= 1"),
])
def test_bad_input_gives_one_line_errors(case, message, dataset, adapters, tmp_path, capsys):
    video_dir, query_dir = dataset
    extra = {
        "missing_adapter": ["--answer_adapter", str(tmp_path / "nope")],
        "other_base": ["--answer_adapter", str(adapters["other_base"])],
        "swapped": ["--retrieval_adapter", str(adapters["answer"]), "--answer_adapter", str(adapters["retrieval"])],
        "both_answer": ["--lora_adapter_1_path", str(adapters["answer"]), "--lora_adapter_2_path",
                        str(adapters["answer"])],
        "empty_queries": [],
        "bad_threads": ["--decode_threads", "0"],
        "no_questions": ["--max_questions", "0"],
    }[case]
    if case == "empty_queries":
        (tmp_path / "empty").mkdir()
        dataset = (video_dir, tmp_path / "empty")
    assert main(_args(dataset, tmp_path / "out", *extra)) == 2  # the project's user-error exit code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


def test_failing_questions_are_recorded_and_the_run_goes_on(dataset, tmp_path):
    # every prompt + 40000 new tokens exceeds the 32768-token context: each QA fails, the files are still written
    assert main(_args(dataset, tmp_path, "--max_new_tokens", "40000", "--max_questions", "2")) == 0
    for name in VIDEOS:
        chain = json.loads((tmp_path / f"{name}.json").read_text())["Data"][0]
        assert len(chain) == 2 and all("context limit" in r["error"] and r["prediction"] == "" for r in chain)
        assert [len(r["predicted_coi"]) for r in chain] == [0, 1]
