"""StreamingSession: fixed and faithful paths give identical outputs while the resize budget does not bind; the
fixed path encodes each segment exactly once; clear errors for a stream that outgrows --max_stream_frames, a
missing segment and an unreadable video; per-(stream, question) seeds."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cogstream_jax.data.synth import sample_dataset_dir
from cogstream_jax.errors import ConfigError, InputError, VideoError
from cogstream_jax.inference import session as session_module
from cogstream_jax.inference.loading import load_model_and_processor
from cogstream_jax.inference.session import SessionOptions, StreamingSession

VIDEO = "synth_0_000"


@pytest.fixture(scope="module")
def tiny():
    model, processor, sampling = load_model_and_processor("tiny")
    return model, processor, sampling.greedy()


def _segments():
    return sorted((sample_dataset_dir() / "event_segments" / VIDEO).glob("*.mp4"))


def _questions():
    chain = json.loads((sample_dataset_dir() / "QA_Dataset" / f"{VIDEO}.json").read_text())[0]
    return [qa["Q"] for qa in chain]


def _run(tiny, resize, reuse_prefix=True):
    model, processor, sampling = tiny
    session = StreamingSession(model, processor, sampling=sampling,
                               options=SessionOptions(resize=resize, max_new_tokens=6, reuse_prefix=reuse_prefix))
    session.reset(VIDEO)
    segs, qs = _segments(), _questions()
    answers, calls = [], []
    session.add_segment(segs[0])
    answers.append(session.ask(qs[0]))
    calls.append(session.encoder.calls)
    answers.append(session.ask(qs[1]))
    calls.append(session.encoder.calls)
    session.add_segment(segs[1])
    answers.append(session.ask(qs[2]))
    calls.append(session.encoder.calls)
    return answers, calls, session


def test_fixed_equals_faithful_and_never_reencodes(tiny):
    fixed, fixed_calls, session = _run(tiny, "fixed")
    faithful, faithful_calls, _ = _run(tiny, "faithful")
    for a, b in zip(fixed, faithful):
        assert (a.answer, a.selection, a.if_visual, a.predicted_coi, a.prompt_tokens) == \
               (b.answer, b.selection, b.if_visual, b.predicted_coi, b.prompt_tokens)
    assert fixed_calls == [1, 1, 2]  # one encoder run per segment, at add_segment
    assert faithful_calls == [1, 2, 4]  # the official protocol re-encodes every clip for every question
    assert fixed[0].selection == "" and fixed[0].predicted_coi == [] and fixed[0].if_visual
    assert len(fixed[2].predicted_coi) == 2
    # the prediction becomes the assistant turn later questions see
    assert [m["content"] for m in session.conversation if m["role"] == "assistant"] == [a.answer for a in fixed]


def test_prefix_reuse_changes_no_answer(tiny):
    reused, _, session = _run(tiny, "fixed")
    fresh, _, _ = _run(tiny, "fixed", reuse_prefix=False)
    for a, b in zip(reused, fresh):
        assert (a.answer, a.selection, a.prompt_tokens) == (b.answer, b.selection, b.prompt_tokens)
    answer_cache = session.prefixes["answer"]
    assert 0 < answer_cache.reused_tokens < reused[-1].prompt_tokens  # the last question reused its history
    assert session.prefixes["retrieval"].reused_tokens > 0
    session.clear_prefix_caches()
    assert session.prefixes == {}


def test_question_keys_depend_only_on_stream_and_index(tiny):
    model, processor, sampling = tiny
    a = StreamingSession(model, processor, options=SessionOptions(seed=7))
    b = StreamingSession(model, processor, options=SessionOptions(seed=7))
    a.reset("vidA")
    b.reset("vidB")
    b.reset("vidA")
    np.testing.assert_array_equal(a.question_key(3), b.question_key(3))
    assert not np.array_equal(a.question_key(3), a.question_key(4))


def test_stream_outgrowing_max_stream_frames_names_the_flag(tiny):
    model, processor, sampling = tiny
    session = StreamingSession(model, processor, options=SessionOptions(resize="fixed", max_stream_frames=12))
    session.add_segment(_segments()[0])
    with pytest.raises(ConfigError, match="--max_stream_frames 12"):
        for path in _segments()[1:]:
            session.add_segment(path)


def test_missing_and_unreadable_segments(tiny, tmp_path):
    model, processor, _ = tiny
    for resize in ("fixed", "faithful"):
        session = StreamingSession(model, processor, options=SessionOptions(resize=resize))
        with pytest.raises(VideoError, match="missing_segment_1.mp4"):
            session.add_segment(tmp_path / "missing_segment_1.mp4")
        bad = tmp_path / "bad_segment_1.mp4"
        bad.write_bytes(b"not a video at all" * 10)
        with pytest.raises(VideoError, match="bad_segment_1.mp4"):
            session.add_segment(bad)
        assert session.pending == []


def test_rejected_segment_leaves_the_timeline_untouched(tiny):
    model, processor, _ = tiny
    segs = _segments()
    clean = StreamingSession(model, processor, options=SessionOptions(resize="fixed", max_stream_frames=100))
    clean.add_segment(segs[0])
    clean.add_segment(segs[2])
    frames = [c.num_frames for c in clean.cached]
    session = StreamingSession(model, processor, options=SessionOptions(
        resize="fixed", max_stream_frames=frames[0] + frames[1]))
    session.add_segment(segs[0])
    with pytest.raises(ConfigError, match="--max_stream_frames"):
        session.add_segment(segs[1])  # more frames than the third clip: over the limit
    session.add_segment(segs[2])
    assert [c.timestamps for c in session.cached] == [c.timestamps for c in clean.cached]


def test_reserved_token_text_cannot_break_the_stream(tiny, monkeypatch):
    """A question spelling '<image>' is refused naming the question; a recorded failure and an answer whose
    ordinary tokens spell '<image>' / '<|im_end|>' re-enter later prompts without those strings."""
    model, processor, sampling = tiny
    session = StreamingSession(model, processor, sampling=sampling, options=SessionOptions(max_new_tokens=10))
    session.reset(VIDEO)
    session.add_segment(_segments()[0])
    qs = _questions()
    with pytest.raises(InputError, match=r"question 0: .*'<image>'"):
        session.ask("What is in the <image> at the start?")
    session.record_failure("What is in the <image><|im_end|> at the start?")
    spelled = [40, 366, 1805, 29, 82639, 318, 6213, 91, 29]  # ordinary tokens only
    assert processor.tokenizer.decode(spelled) == "I <image> <|im_end|>"
    real = session_module.generate_with_prefix

    def forced(model_, prefix, ids, **kwargs):
        out = real(model_, prefix, ids, **kwargs)
        if kwargs.get("allowed_token_ids") is None:  # the answer, not retrieval
            out = np.full_like(out, 151643)
            out[0, :len(spelled)] = spelled
        return out

    monkeypatch.setattr(session_module, "generate_with_prefix", forced)
    assert session.ask(qs[0]).answer == "I <image> <|im_end|>"  # reported as generated
    monkeypatch.setattr(session_module, "generate_with_prefix", real)
    assert session.ask(qs[1]).answer  # the history holds the stripped texts, so later questions still work
    assert [m["content"] for m in session.conversation if m["role"] == "assistant"][:2] == ["", "I  "]
