"""Prompts: the port re-renders the official rendered examples byte for byte, and builds new prompts with the
same fixed parts and the official per-pair / per-frame formats."""
from __future__ import annotations

import json
import pathlib

import pytest

from cogstream_jax.data import prompts
from cogstream_jax.errors import DataError

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference"
PROMPTS_DIR = SHARED / "cogstream-prompts"


def shared(name: str) -> str:
    return (PROMPTS_DIR / name).read_bytes().decode("utf-8")


@pytest.fixture(scope="module")
def example_inputs():
    data = json.loads(shared("retrieval_rendered_example.inputs.json"))
    return data["current_Q"], list(zip(data["hist_Qs"], data["hist_As"]))


def test_shipped_files_are_verbatim_copies_with_license():
    for path in PROMPTS_DIR.iterdir():
        assert prompts.read_prompt_file(path.name) == shared(path.name)
    license_text = prompts.read_prompt_file("LICENSE")
    assert "MIT License" in license_text and "Copyright (c) 2025 LiamZhao326" in license_text


def test_retrieval_prompt_rerenders_both_examples_byte_for_byte(example_inputs):
    question, history = example_inputs
    assert prompts.retrieval_prompt(question, history).encode() == (PROMPTS_DIR / "retrieval_rendered_example.txt").read_bytes()
    assert prompts.retrieval_prompt(question, history, with_demos=False).encode() == (
        PROMPTS_DIR / "retrieval_rendered_no_demo.txt"
    ).read_bytes()


def test_event_summary_prompt_rerenders_example_byte_for_byte():
    rendered = prompts.event_summary_prompt([12.0, 13.0], 3)
    assert rendered.encode() == (PROMPTS_DIR / "event_summary_rendered_example.txt").read_bytes()
    assert rendered.endswith("<|im_start|>assistant")  # no trailing newline, as in the official code


def test_retrieval_prompt_structure_for_other_histories():
    template = prompts.retrieval_template()
    assert template.head.endswith("<|im_end|><|im_start|>user\n\n")  # raw concatenation, no newline between blocks
    assert template.demos.startswith("Example:\nCurrent Question: What causes earthquakes?")
    assert template.demos.count("→ Output:") == 2
    assert template.tail.endswith("<|im_end|><|im_start|>assistant\n")
    empty = prompts.retrieval_prompt("Q?", [], with_demos=False)
    assert "Current Question: Q?\n\nHistorical QA Pairs (ordered by time):\nGenerate a bracketed" in empty
    five = prompts.retrieval_prompt("Q?", [(f"q{i}", f"a{i}") for i in range(12)])
    assert "\n11. Q: q11\n   A: a11\nGenerate" in five and "\n0. Q: q0\n   A: a0\n1. Q: q1" in five


def test_event_summary_uses_one_decimal_and_tokens_per_frame():
    text = prompts.event_summary_prompt([0, 7.25, 100.0], 2)
    assert "user\nTime 0.0s:<image><image>,Time 7.2s:<image><image>,Time 100.0s:<image><image>\nConcisely" in text


def test_retrieval_target_and_selection_format():
    assert prompts.retrieval_target(True, [0, 5]) == "[yes,0,5]<|im_end|>"
    assert prompts.retrieval_target(False, []) == "[no]<|im_end|>"


@pytest.mark.parametrize("metric,number", [("IA", 1), ("DC", 2), ("CA", 3), ("TP", 4), ("LC", 5)])
def test_judge_rubrics_verbatim(metric, number):
    assert prompts.judge_rubric(metric) == shared(f"judge_{number}_{metric}_rubric.txt")


def test_unknown_metric_names_field():
    with pytest.raises(DataError, match="metric"):
        prompts.judge_rubric("XX")
