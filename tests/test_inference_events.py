"""Question-aware event compression: injected cosines give exactly the intended minor frames; the one padded
batch equals per-event forwards; token-0 pooling and the minor override combine with DiffFP like the official
mask; end to end on the >135-frame bundled sample stream."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cogstream_jax.data.difffp import difffp_mask
from cogstream_jax.data.synth import sample_dataset_dir
from cogstream_jax.inference import events
from cogstream_jax.inference.kmeans import time_kmeans
from cogstream_jax.inference.loading import load_model_and_processor


@pytest.fixture(scope="module")
def tiny():
    model, processor, _ = load_model_and_processor("tiny")
    return model, processor


def _event_stream(t=150, p=3, d=8, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((10, 1, d)) * 4
    labels = np.repeat(np.arange(10), t // 10)
    feats = means[labels] + 0.3 * rng.standard_normal((t, p, d))
    return feats.reshape(t * p, d).astype(np.float32), [float(i) for i in range(t)]


def test_injected_scores_mark_exactly_the_intended_minor_frames():
    features, stamps = _event_stream()
    key = jax.random.PRNGKey(0)
    scores = np.asarray([0.9, 0.1, 0.5, 0.44, 0.45, 0.2, 0.8, 0.3, 0.46, 0.0])
    out = events.compress_events(None, None, jnp.asarray(features), stamps, "q?", key, scores=scores)
    clusters = time_kmeans(features.reshape(150, 3, 8), np.asarray(stamps, np.float32), 10, key)
    np.testing.assert_array_equal(out.clusters.assignments, clusters.assignments)
    low = {k for k in range(10) if scores[k] < 0.45}
    reps = set(clusters.representatives.reshape(-1).tolist())
    want = [f for f in range(150) if clusters.assignments[f] in low and f not in reps]
    assert list(out.minor_frames) == want
    assert len(want) == sum((clusters.assignments == k).sum() - 2 for k in low)  # 2 representatives kept each
    short = events.compress_events(None, None, jnp.asarray(features[:135 * 3]), stamps[:135], "q?", key, scores=scores)
    assert short == events.NO_COMPRESSION  # 135 frames: memory_length 9, nothing happens (official)


def test_batched_event_forward_equals_per_event_forwards(tiny):
    model, processor = tiny
    features, stamps = _event_stream(t=40, p=4, d=model.config.text.hidden_size, seed=1)
    clusters = time_kmeans(features.reshape(40, 4, -1), np.asarray(stamps, np.float32), 3, jax.random.PRNGKey(1))
    ids, mask, evs, order = events.event_batch(processor.tokenizer, stamps, 4, clusters, "What is the red ball doing?")
    assert len(evs) == 3 and ids.shape[0] == 4  # 3 events + the question, one packed sequence
    frames = jnp.asarray(features.reshape(40, 4, -1)[order].reshape(-1, features.shape[-1]))
    batched = events.pooled_hidden(model, ids, mask, frames)
    start = 0
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        slots = int((ids[row, :n] == model.config.image_token_id).sum())
        single = events.pooled_hidden(model, ids[row:row + 1, :n], mask[row:row + 1, :n],
                                      frames[start:start + slots] if slots else None)
        start += slots
        np.testing.assert_allclose(batched[row], single[0], rtol=2e-5, atol=2e-5)
    assert start == frames.shape[0]
    # the event prompt is the shared rendering with 4 <image> per member frame, no trailing newline
    text = processor.tokenizer.decode(ids[0, :int(mask[0].sum())].tolist())
    members = np.nonzero(clusters.assignments == 0)[0]
    assert text.count("<image>") == 4 * len(members) and text.endswith("<|im_start|>assistant")


def test_pooling_and_minor_override_match_the_official_mask():
    rng = np.random.default_rng(3)
    grids = [[3, 4, 4], [1, 4, 4], [2, 4, 4]]  # a single-frame clip in the middle
    pixels = rng.integers(0, 3, size=(sum(t * h * w for t, h, w in grids), 588)).astype(np.float32) / 127.5 - 1
    pixels[16:32] = pixels[0:16]  # frame 1 identical to frame 0: DiffFP keeps only its token 0
    minor = [1, 2, 3, 5]
    official = difffp_mask(pixels, grids, [2, 2, 2], minor_frame_indices=minor)
    rows = np.cumsum([0] + [t * h * w for t, h, w in grids])
    clips = [difffp_mask(pixels[a:b], [g], [2]).reshape(g[0], -1) for a, b, g in zip(rows[:-1], rows[1:], grids)]
    np.testing.assert_array_equal(events.override_minor_frames(clips, minor), official)
    feats = jnp.asarray(rng.standard_normal((6 * 4, 5)), jnp.float32)
    pooled = np.asarray(events.pool_minor_frames(feats, [2, 4], 4)).reshape(6, 4, 5)
    ref = np.asarray(feats).reshape(6, 4, 5)
    np.testing.assert_allclose(pooled[2, 0], ref[2].mean(0), rtol=1e-6)
    np.testing.assert_allclose(pooled[4, 0], ref[4].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(pooled[[0, 1, 3, 5]], ref[[0, 1, 3, 5]])
    np.testing.assert_array_equal(pooled[2, 1:], ref[2, 1:])


@pytest.mark.slow
def test_end_to_end_on_the_long_sample_stream(tiny):
    from cogstream_jax.inference.session import SessionOptions, StreamingSession

    model, processor = tiny
    root = sample_dataset_dir() / "event_segments" / "synth_0_long_00"
    sessions = [StreamingSession(model, processor, options=SessionOptions(resize="fixed", max_new_tokens=4,
                                                                          reuse_prefix=reuse))
                for reuse in (True, False)]
    answers = []
    for session in sessions:
        for path in sorted(root.glob("*.mp4")):
            session.add_segment(path)
        answers.append([session.ask(q) for q in ("What happens to the blue square?", "And then?")])
    # prefix reuse (pooled minor-frame rows keyed apart from plain rows) changes no answer or minor frame
    assert [(a.answer, a.minor_frames) for a in answers[0]] == [(a.answer, a.minor_frames) for a in answers[1]]
    session, answer = sessions[0], answers[0][0]
    assert session.frames > 135
    assert answer.num_events == events.num_events(session.frames) == 10
    per_frame = session.cached[0].tokens_per_frame
    assert all(0 <= f < session.frames for f in answer.minor_frames)
    assert answer.prompt_tokens < session.frames * per_frame + 200
    assert set(answer.timings) >= {"retrieval_s", "events_s", "answer_s", "total_s"}
