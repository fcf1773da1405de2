"""History rewrite: the structured implementation equals a regex re-implementation of the official
`process_input_ids` (tests/official_rewrite_reference.py) on many conversations, for the
FCC / AC / NC / gt modes, odd selection strings, `no`, glued visual prefixes and repeated questions."""
from __future__ import annotations

import itertools
import re

import pytest

from cogstream_jax.data import tokens
from cogstream_jax.data.rewrite import (
    Frame,
    Turn,
    history_of,
    render_turns,
    rewrite,
    rewrite_for_mode,
    turns_from_conversation,
)
from cogstream_jax.data.selection import parse_selection, postprocess_generated
from cogstream_jax.data.template import expand_image_tokens, render_conversation
from cogstream_jax.errors import InputError

from official_rewrite_reference import official_mode
from real_processor_cache import real_processor, real_tokenizer


# ---- conversations -----------------------------------------------------------------------------------------------
def five_qa_conversation(questions=None, answers=None, tokens_per_frame=3):
    """System turn, 3 segments (2, 3, 1 frames) and 5 QAs: Q0+seg1, Q1, Q2+seg2, Q3, Q4+seg3 (current)."""
    qs = questions or ["What is red?", "Where does it go?", "What appears next?", "Which is bigger?", "Why did it stop?"]
    as_ = answers or ["A red circle.", "To the left.", "A blue square.", "The square.", "It hit the wall."]
    video = {"type": "video", "video": {"video_path": "x.mp4", "fps": 1, "max_frames": 180}}
    conv = [{"role": "system", "content": "You are a helpful assistant."}]
    layout = [(0, True), (1, False), (2, True), (3, False), (4, True)]
    for k, (qi, with_video) in enumerate(layout):
        if with_video:
            conv.append({"role": "user", "content": [video, {"type": "text", "text": qs[qi]}]})
        else:
            conv.append({"role": "user", "content": qs[qi]})
        if k < 4:
            conv.append({"role": "assistant", "content": as_[qi]})
    stamps = [[0.0, 1.0], [2.0, 3.0, 4.0], [5.0]]
    return conv, stamps, tokens_per_frame


def both_ways(conv, stamps, tpf):
    counts = [tpf] * sum(len(s) for s in stamps) if isinstance(tpf, int) else list(tpf)
    text = expand_image_tokens(render_conversation(conv, video_timestamps=stamps), counts)
    turns = turns_from_conversation(conv, video_timestamps=stamps, tokens_per_frame=tpf)
    return text, turns


SELECTIONS = [
    "[yes]", "[no]", "[yes,0]", "[no,1]", "[yes,0,2]", "[no,0,3]", "[yes,3,1]", "[yes,1,1]", "[no,0,1,2,3]",
    "[maybe,1]", "", "[]", "[,2]", "yes,2", "[yes,7]", "[no,9,0]", "[yes,-1]", "[yes, 2 ,x,3]", "[[no,2]]", "no",
]


@pytest.mark.parametrize("selection", SELECTIONS)
def test_fcc_five_qa_history_matches_official(selection):
    conv, stamps, tpf = five_qa_conversation()
    text, turns = both_ways(conv, stamps, tpf)
    hist_qs, hist_as, current = history_of(turns)
    assert render_turns(turns) == text
    expected = official_mode(text, hist_qs, hist_as, current, "FCC", predicted=selection)
    result = rewrite_for_mode(turns, "FCC", predicted=selection)
    assert result.text == expected
    assert result.text.count("<image>") == 3 * len(result.kept_frames)


def test_every_subset_and_mode_matches_official():
    conv, stamps, tpf = five_qa_conversation()
    text, turns = both_ways(conv, stamps, tpf)
    hist_qs, hist_as, current = history_of(turns)
    cases = 0
    for r in range(0, 5):
        for subset in itertools.combinations(range(4), r):
            for visual in (True, False):
                got = rewrite_for_mode(turns, "gt", gt_coi=subset, gt_visual=visual).text
                assert got == official_mode(text, hist_qs, hist_as, current, "gt", gt=subset, gt_visual=visual)
                cases += 1
    for mode in ("AC", "NC"):
        assert rewrite_for_mode(turns, mode).text == official_mode(text, hist_qs, hist_as, current, mode)
    assert cases == 32


def test_no_removes_every_visual_run():
    conv, stamps, tpf = five_qa_conversation()
    _, turns = both_ways(conv, stamps, tpf)
    result = rewrite_for_mode(turns, "FCC", predicted="[no,1]")
    assert result.if_visual is False and result.kept_frames == ()
    assert "<image>" not in result.text and "Time " not in result.text
    assert result.text.endswith("<|im_start|>user\nWhere does it go?<|im_end|>\n<|im_start|>assistant\nTo the left."
                                "<|im_end|>\n<|im_start|>user\nWhy did it stop?<|im_end|>\n<|im_start|>assistant\n")


def test_visual_prefixes_are_glued_to_the_next_turn():
    conv, stamps, tpf = five_qa_conversation(tokens_per_frame=2)
    _, turns = both_ways(conv, stamps, tpf)
    result = rewrite_for_mode(turns, "NC")
    img = "<image><image>"
    assert result.text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\nTime 0.0s:{img},Time 1.0s:{img}"
        f"Time 2.0s:{img},Time 3.0s:{img},Time 4.0s:{img}"
        f"Time 5.0s:{img}\nWhy did it stop?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert result.kept_frames == (0, 1, 2, 3, 4, 5)


def test_kept_frames_follow_image_runs_with_varying_token_counts():
    conv, stamps, _ = five_qa_conversation()
    per_frame = [1, 2, 3, 4, 5, 6]
    text, turns = both_ways(conv, stamps, per_frame)
    result = rewrite_for_mode(turns, "FCC", predicted="[yes,2]")
    hist_qs, hist_as, current = history_of(turns)
    assert result.text == official_mode(text, hist_qs, hist_as, current, "FCC", predicted="[yes,2]")
    runs = [len(m) // len("<image>") for m in re.findall(r"(?:<image>)+", result.text)]
    assert runs == [per_frame[i] for i in result.kept_frames]


def test_repeated_questions_and_whitespace_quirks_match_official():
    qs = ["Same?", "Same?", "Multi\nline?", " padded ", "Same?"]
    as_ = ["yes", "yes", "two lines", "pad", "?"]
    conv, stamps, tpf = five_qa_conversation(qs, as_)
    text, turns = both_ways(conv, stamps, tpf)
    hist_qs, hist_as, current = history_of(turns)
    for sel in ("[yes]", "[yes,0]", "[no,2]", "[yes,2,3]", "[no]", "[no,3]", "[yes,1]"):
        assert rewrite_for_mode(turns, "FCC", predicted=sel).text == official_mode(
            text, hist_qs, hist_as, current, "FCC", predicted=sel
        ), sel


def test_empty_prediction_keeps_the_generation_segment_like_official():
    conv, stamps, tpf = five_qa_conversation(answers=["", "b", "c", "d", "e"])
    text, turns = both_ways(conv, stamps, tpf)
    hist_qs, hist_as, current = history_of(turns)
    for sel in ("[yes,0]", "[no,0]"):
        got = rewrite_for_mode(turns, "FCC", predicted=sel).text
        assert got == official_mode(text, hist_qs, hist_as, current, "FCC", predicted=sel)
        assert got.endswith("<|im_start|>assistant\n<|im_end|>\n<|im_start|>assistant\n")


def test_first_question_is_never_filtered():
    conv, stamps, tpf = five_qa_conversation()
    first = conv[:2]
    text, turns = both_ways(first, stamps[:1], tpf)
    for mode in ("FCC", "AC", "NC", "gt"):
        result = rewrite_for_mode(turns, mode, predicted="[no]", gt_coi=(), gt_visual=False)
        assert result.text == text and result.if_visual and result.kept_frames == (0, 1)


def test_token_ids_equal_tokenizing_the_official_text():
    tokenizer = real_tokenizer()
    conv, stamps, tpf = five_qa_conversation()
    text, turns = both_ways(conv, stamps, tpf)
    hist_qs, hist_as, current = history_of(turns)
    result = rewrite_for_mode(turns, "FCC", predicted="[yes,1,3]")
    ids = result.token_ids(tokenizer)
    assert ids == tokenizer(official_mode(text, hist_qs, hist_as, current, "FCC", predicted="[yes,1,3]"))["input_ids"]
    assert ids.count(tokens.IMAGE_TOKEN_ID) == 3 * len(result.kept_frames)
    assert ids[-3:] == list(tokens.GENERATION_PROMPT_IDS)


def test_random_conversations_match_official():
    import random

    rng = random.Random(0)
    words = ["a", "b c", "red?", "x\ny", " s ", "Same?"]
    for _ in range(150):
        n = rng.randint(2, 6)
        qs = [rng.choice(words) for _ in range(n)]
        as_ = [rng.choice(words + [""]) for _ in range(n)]
        conv = [{"role": "system", "content": "sys"}]
        stamps, t = [], 0.0
        for i in range(n):
            if rng.random() < 0.5 or i == 0:
                k = rng.randint(1, 3)
                stamps.append([t + j for j in range(k)])
                t += k
                conv.append({"role": "user", "content": [{"type": "video", "video": {}}, {"type": "text", "text": qs[i]}]})
            else:
                conv.append({"role": "user", "content": qs[i]})
            if i < n - 1:
                conv.append({"role": "assistant", "content": as_[i]})
        text, turns = both_ways(conv, stamps, rng.randint(0, 2))
        hist_qs, hist_as, current = history_of(turns)
        sel = "[" + ",".join([rng.choice(["yes", "no", "maybe"])] + [str(rng.randint(0, n)) for _ in range(rng.randint(0, 3))]) + "]"
        got = rewrite_for_mode(turns, "FCC", predicted=sel)
        assert got.text == official_mode(text, hist_qs, hist_as, current, "FCC", predicted=sel), (conv, sel)


def test_parsed_selection_rules():
    assert parse_selection("[maybe,1]").if_visual and parse_selection("[maybe,1]").indices == (1,)
    assert parse_selection("[no,9,0]").resolve(3) == (0,)
    assert parse_selection("").if_visual and parse_selection("").indices == ()
    assert postprocess_generated("  ") == "[yes]" and postprocess_generated("no,1") == "[no,1]"


def test_bad_turns_are_rejected():
    with pytest.raises(InputError, match=r"turns\[1\]\.text"):
        rewrite([Turn("system", "s"), Turn("user", "a<|im_end|>b", (Frame(0, 0.0, 1),))], parse_selection("[yes]"))
    with pytest.raises(InputError, match="mode"):
        rewrite_for_mode([Turn("user", "q")], "XYZ")
    with pytest.raises(InputError, match="video_timestamps"):
        turns_from_conversation([{"role": "user", "content": [{"type": "video", "video": {}}, {"type": "text", "text": "q"}]}],
                                video_timestamps=[], tokens_per_frame=1)


def test_processor_output_of_a_stage2_sample_rewrites_like_official():
    """End to end on real MP4s: the Processor's expanded text equals our rendering of the typed turns, and
    the gt-mode rewrite equals the official regex rewrite of that text."""
    from cogstream_jax.data.dataset import load_dataset
    from cogstream_jax.data.stage2_samples import stage2_episode
    from cogstream_jax.data.rewrite import turns_from_processor_output
    from cogstream_jax.data.synth import sample_dataset_dir

    video = load_dataset(sample_dataset_dir()).video("synth_0_000")
    sample = next(s for s in stage2_episode(video, 0) if len(s.segment_paths) == 2 and s.coi)
    output = real_processor()(conversation=list(sample.conversation), return_text=True)
    turns = turns_from_processor_output(list(sample.conversation), output)
    assert render_turns(turns) == output.text
    hist_qs, hist_as, current = history_of(turns)
    for visual in (True, False):
        got = rewrite_for_mode(turns, "gt", gt_coi=sample.coi, gt_visual=visual)
        assert got.text == official_mode(output.text, hist_qs, hist_as, current, "gt", gt=sample.coi, gt_visual=visual)
        assert len(got.kept_frames) == (output.num_frames if visual else 0)
