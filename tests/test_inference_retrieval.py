"""Historic Dialogue Retrieval: constrained decoding only emits the 16 allowed ids; official post-processing and
parsing of odd outputs; the prompts equal the shared renderings; the four modes."""
from __future__ import annotations

import json
import pathlib
import re

import pytest

from cogstream_jax.data.prompts import event_summary_prompt, retrieval_prompt
from cogstream_jax.data.selection import ALLOWED_TOKEN_IDS, allowed_token_ids, postprocess_generated
from cogstream_jax.inference import retrieval
from cogstream_jax.inference.loading import load_model_and_processor

SHARED = pathlib.Path("/work/shared/reference/cogstream-prompts")
PACKAGED = pathlib.Path(__file__).resolve().parents[1] / "cogstream_jax" / "assets" / "cogstream_prompts"


@pytest.fixture(scope="module")
def tiny():
    model, processor, _ = load_model_and_processor("tiny")
    return model, processor


def test_constrained_retrieval_only_emits_allowed_tokens(tiny):
    model, processor = tiny
    assert tuple(allowed_token_ids(processor.tokenizer)) == ALLOWED_TOKEN_IDS
    out = retrieval.predict_selection(model, processor.tokenizer, "Why did he open it again?",
                                      ["What is the man holding?", "What is he doing with it?"],
                                      ["A red umbrella.", "Shaking water off it."], max_new_tokens=12)
    assert re.fullmatch(r"(\[|\]|,|\d|no|yes)*", out.raw_text), out.raw_text
    assert out.selection.startswith("[") and out.selection.endswith("]")
    assert out.selection == postprocess_generated(out.raw_text)


@pytest.mark.parametrize("generated, visual, indices, coi", [
    ("[yes]", True, (), [0, 0, 0, 0]),
    ("[no,0,3]", False, (0, 3), [1, 0, 0, 1]),
    ("", True, (), [0, 0, 0, 0]),  # empty -> "[yes]"
    ("no,2", False, (2,), [0, 0, 1, 0]),  # missing brackets are added
    ("[maybe,1]", True, (1,), [0, 1, 0, 0]),  # unknown head: visual stays True, non-integers skipped
    ("[yes,1,9,12]", True, (1, 9, 12), [0, 1, 0, 0]),  # out-of-range indices never reach predicted_coi
])
def test_official_post_processing_and_parsing(generated, visual, indices, coi):
    out = retrieval.from_selection(postprocess_generated(generated), generated)
    assert (out.if_visual, out.indices, out.predicted_coi(4)) == (visual, indices, coi)


def test_prompts_equal_the_shared_renderings():
    base = SHARED if SHARED.is_dir() else PACKAGED
    inputs = json.loads((base / "retrieval_rendered_example.inputs.json").read_text())
    history = list(zip(inputs["hist_Qs"], inputs["hist_As"]))
    assert retrieval_prompt(inputs["current_Q"], history) == (base / "retrieval_rendered_example.txt").read_text()
    assert retrieval_prompt(inputs["current_Q"], history, with_demos=False) == \
        (base / "retrieval_rendered_no_demo.txt").read_text()
    assert event_summary_prompt([12.0, 13.0], 3) == (base / "event_summary_rendered_example.txt").read_text()


def test_modes():
    called = []
    predict = lambda: called.append(1) or retrieval.from_selection("[no,1]")  # noqa: E731
    assert retrieval.select_for_mode("FCC", 0, predict=predict) == retrieval.NOTHING  # first QA: unfiltered
    assert retrieval.select_for_mode("AC", 3, predict=predict) == retrieval.NOTHING
    assert retrieval.select_for_mode("NC", 3).selection == "[yes]"
    gt = retrieval.select_for_mode("gt", 3, gt_coi=[2, 0], gt_visual=False)
    assert (gt.selection, gt.indices, gt.if_visual) == ("[no,2,0]", (2, 0), False)
    assert retrieval.select_for_mode("FCC", 3, predict=predict).indices == (1,) and called == [1]
    assert retrieval.NOTHING.predicted_coi(2) == [0, 0]
