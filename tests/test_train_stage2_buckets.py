"""Bucketed, data-parallel stage 2 (issue 14 items 2-3): padding changes nothing, a call of several QAs equals
the same QAs one by one, on (data 4) and (data 2, fsdp 2, tensor 2) meshes; the bucket ladders; bad input."""
from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from cogstream_jax import config as configs
from cogstream_jax import lora
from cogstream_jax.model.frame_vision import PATCH_BUCKETS
from cogstream_jax.sharding import make_mesh
from cogstream_jax.training import stage2_buckets as sb
from cogstream_jax.training import stage2_frames as sf
from cogstream_jax.training.setup import build_setup
from cogstream_jax.training.stage2_device import Stage2Device
from cogstream_jax.training.step import StepOptions


@functools.lru_cache(maxsize=None)
def _prepared():
    """Four QAs before DiffFP (and the processor): 1 clip, 2 clips, no visual tokens, another video's grid."""
    from cogstream_jax.data.dataset import load_dataset
    from cogstream_jax.data.stage2_samples import stage2_episode
    from cogstream_jax.data.processor import Processor
    from cogstream_jax.data.synth import sample_dataset_dir
    from cogstream_jax.reference_files import bundled_model_dir

    processor = Processor.from_pretrained(bundled_model_dir(), cache_frames=True)
    videos = load_dataset(sample_dataset_dir()).videos
    a = stage2_episode(videos[0], 0)
    b = stage2_episode(videos[-1], 0)
    text_only = next(s for s in a if not s.is_visual)
    return [sb.prepare_qa(s, processor) for s in (a[1], a[5], text_only, b[2])], processor


@functools.lru_cache(maxsize=None)
def _samples():
    return [sb.finalize_qa(qa) for qa in _prepared()[0]]


def _setup(mesh, seed=0, dropout=True):
    model = configs_model(seed)
    return build_setup(model, lora.FULL_MODULE, lora.full_module_spec(model.config), optax.adamw(1e-2, eps=1e-3), mesh,
                       seed=0, options=StepOptions(dropout=dropout, remat="none"))


def configs_model(seed):
    from cogstream_jax.model.videollama3 import VideoLlama3

    model = VideoLlama3(configs.tiny(), rngs=nnx.Rngs(seed))
    return model


def _randomise_adapter(setup, seed=1):
    """Nonzero lora_b so every adapter gets gradient through both factors."""
    leaves, treedef = jax.tree.flatten(setup.state.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    setup.state = setup.state.replace(params=jax.device_put(jax.tree.unflatten(treedef, leaves),
                                                             setup.state_sharding.params))


def _grad_call(device, setup, qas, indices, *, row_weight, min_tokens=0, min_patches=0):
    needs = [sf.frame_needs(q.layout) for q in qas]
    merge, frames = max(m for _, _, m in needs), None
    if merge:
        frames = sf.pack_row_frames([q.layout for q in qas], [q.pixel_values for q in qas],
                                    rows_per_device=len(qas) // device.dp, frames_per_row=max(f for f, _, _ in needs),
                                    patches=sf.patches_bucket(max(p for _, p, _ in needs), merge, min_patches),
                                    merge=merge, patch_dim=next(q.pixel_values for q in qas if q.layout).shape[-1])
    call = sb.pack_call(qas, indices, frames.token_rows if frames else [None] * len(qas), row_weight=row_weight,
                        min_tokens=min_tokens)
    inputs = device.inputs(call, device.vision(frames))
    arrays = {k: device.put(v) for k, v in call.arrays.items()}
    grads, losses, counts = device.grad(setup.state, setup.frozen, arrays, inputs)
    return jax.device_get(grads), np.asarray(losses), np.asarray(counts), call


def _max_diff(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a),
                                                                                 jax.tree.leaves(b)))


def _max_abs(a):
    return max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(a))


def test_padding_into_a_larger_bucket_changes_nothing():
    qas = _samples()
    mesh = make_mesh("1,1,1", devices=jax.devices()[:1])
    setup = _setup(mesh)
    _randomise_adapter(setup)
    device = Stage2Device(setup)
    qa = qas[1]  # two clips: padded tokens, visual inputs, answer positions and patches per frame
    g0, l0, c0, call0 = _grad_call(device, setup, [qa], [3], row_weight=0.25)
    g1, l1, c1, call1 = _grad_call(device, setup, [qa], [3], row_weight=0.25, min_tokens=call0.bucket[0] + 1,
                                   min_patches=256)
    assert call1.bucket[0] > call0.bucket[0] and call1.bucket[1] > call0.bucket[1]
    assert c0[0] == c1[0] == qa.answer_tokens
    assert abs(l0[0] - l1[0]) <= 1e-5 * abs(l0[0]), (l0, l1)
    assert _max_diff(g0, g1) <= 1e-5 * _max_abs(g0)


def test_bucketed_step_equals_the_static_layout_step():
    """The old per-QA step (static VisualLayout, vision tower inside the gradient) gives the same loss/grads."""
    from cogstream_jax.training.stage2_batches import assemble

    qa = _samples()[1]
    mesh = make_mesh("1,1,1", devices=jax.devices()[:1])
    setup = _setup(mesh, dropout=False)
    _randomise_adapter(setup)
    device = Stage2Device(setup)
    g_new, l_new, _, _ = _grad_call(device, setup, [qa], [0], row_weight=1.0)
    mask = np.zeros(qa.layout.num_tokens, bool)
    mask[qa.visual_sources] = True
    old = assemble(qa.ids, qa.labels, qa.pixel_values, qa.layout, mask, (), answer_tokens=qa.answer_tokens,
                   prompt_tokens=qa.prompt_tokens)
    g_old, l_old, _ = setup.qa_grad(1)(setup.state, setup.frozen, old.arrays, 0, old.layout, old.num_kept)
    assert abs(float(l_old) - l_new[0]) <= 1e-5 * abs(float(l_old))
    assert _max_diff(jax.device_get(g_old), g_new) <= 1e-5 * _max_abs(g_new)


@pytest.fixture(scope="module")
def one_by_one():
    """The four QAs accumulated one by one on one device (shared by both meshes): summed gradients, per-QA losses
    and answer counts, the buckets they took, and the LoRA params after one AdamW update with those gradients."""
    one = _setup(make_mesh("1,1,1", devices=jax.devices()[:1]))
    _randomise_adapter(one)
    device = Stage2Device(one)
    total, losses, counts, buckets = None, [], [], set()
    for i, qa in enumerate(_samples()):
        g, loss, count, c = _grad_call(device, one, [qa], [i], row_weight=0.25)
        total = g if total is None else jax.tree.map(np.add, total, g)
        losses.append(loss[0])
        counts.append(count[0])
        buckets.add(c.bucket)
    updated, _ = one.apply()(one.state, jax.device_put(total, one.state_sharding.params))
    return total, losses, counts, buckets, jax.device_get(updated.params)


@pytest.mark.parametrize("mesh_spec", ["4,1,1", "2,2,2"])
def test_one_data_parallel_call_equals_the_qas_one_by_one(mesh_spec, one_by_one):
    """Four different QAs (three buckets, one text-only) in one call on 8 fake devices == accumulated one by one
    on one device: per-QA losses, summed gradients, and the LoRA params after one AdamW update (eps 1e-3: with
    the default 1e-8 Adam's first step is lr * g / |g|, which turns fp32 rounding of near-zero gradients into
    lr-sized differences)."""
    qas = _samples()
    devices = jax.devices()
    dp = _setup(make_mesh(mesh_spec, devices=devices[:8] if mesh_spec == "2,2,2" else devices[:4]))
    _randomise_adapter(dp)
    total, losses, counts, buckets, updated = one_by_one
    g_dp, l_dp, c_dp, _ = _grad_call(Stage2Device(dp), dp, qas, [0, 1, 2, 3], row_weight=0.25)
    assert list(c_dp) == counts == [qa.answer_tokens for qa in qas]
    assert len(buckets) >= 3  # mixed buckets, padded to the largest in the call
    np.testing.assert_allclose(l_dp, losses, rtol=1e-5)
    assert _max_diff(g_dp, total) <= 1e-5 * _max_abs(total)

    s_dp, _ = dp.apply()(dp.state, jax.device_put(g_dp, dp.state_sharding.params))
    assert _max_diff(jax.device_get(s_dp.params), updated) <= 1e-5 * _max_abs(updated)


@pytest.mark.parametrize("mesh_spec", ["1,1,1", "2,2,1"])
def test_one_scoring_call_equals_the_streaming_scoring_qa_by_qa(mesh_spec, monkeypatch):
    """Event scoring of a call's rows in one program (k-means per row on its device, every row's event prompts and
    question packed, one vmapped LLM call) == `events.compress_events` QA by QA with the same adapter and key:
    per-event cosines and the final tokens (forced on for these short streams: 2 events each)."""
    import jax.numpy as jnp

    from cogstream_jax.inference import events
    from cogstream_jax.training import stage2_calls, stage2_scoring
    from cogstream_jax.training.stage2_calls import CallMaker

    monkeypatch.setattr(events, "should_compress", lambda n: n > 1)
    for module in (events, stage2_scoring):
        monkeypatch.setattr(module, "num_events", lambda n: 2)
    prepared, processor = _prepared()
    mesh = make_mesh(mesh_spec, devices=jax.devices()[:1 if mesh_spec == "1,1,1" else 4])
    setup = _setup(mesh)
    _randomise_adapter(setup)
    items = [qa if qa.layout is not None else sb.finalize_qa(qa) for qa in prepared]
    seen = []

    def spy(row, pooled):
        seen.append(stage2_scoring.event_scores(row, pooled))
        return stage2_scoring.minor_frames(row, pooled)

    monkeypatch.setattr(stage2_calls, "minor_frames", spy)
    finals, _, _, dropped = CallMaker(setup, Stage2Device(setup), processor.tokenizer, rows=4, seed=0).finals(
        setup.state, items)
    assert not dropped.any() and len(seen) == 3  # the three visual QAs, scored in one call
    model = setup.model(setup.state)
    key = jax.random.fold_in(jax.random.key(0), 0)
    visual = [(r, qa) for r, qa in enumerate(prepared) if qa.layout is not None]
    for (r, qa), scores in zip(visual, seen):
        features = model.encode_visual(jnp.asarray(qa.out.pixel_values), qa.layout)
        expected = events.compress_events(model, processor.tokenizer, features, qa.out.timestamps, qa.question, key)
        np.testing.assert_allclose(scores, expected.cosine, atol=1e-5)
        np.testing.assert_array_equal(finals[r].ids, sb.finalize_qa(qa, expected.minor_frames).ids)
    np.testing.assert_array_equal(finals[2].ids, items[2].ids)


def test_bucket_ladders():
    assert all(b % 128 == 0 for b in sb.TOKEN_BUCKETS)
    assert all(b / a <= 2.0 for a, b in zip(sb.TOKEN_BUCKETS, sb.TOKEN_BUCKETS[1:]))
    assert sb.bucket(1, sb.TOKEN_BUCKETS) == 256 and sb.bucket(257, sb.TOKEN_BUCKETS) == 512
    assert sb.bucket(sb.TOKEN_BUCKETS[-1] + 1, sb.TOKEN_BUCKETS) is None
    assert all(p % 4 == 0 for p in PATCH_BUCKETS)
    from cogstream_jax.training.stage2_scoring import scoring_length

    # event scoring: 1.5x steps for short streams, 1024-token steps above 4096 (a 180-frame stream's ~18k tokens)
    assert [scoring_length(n) for n in (100, 3000, 4096, 4097, 16500, 18300)] == [128, 3072, 4096, 5120, 17408, 18432]


def _padding(lengths, ladder) -> int:
    return sum(sb.bucket(n, ladder) - n for n in lengths)


def test_chosen_token_buckets_pad_least():
    """The dynamic programme equals a brute force over every set of `count` block sizes on random lengths; the
    chosen sizes extend with the fixed ladder above them; a QA below the first bucket takes it."""
    import itertools

    rng = np.random.default_rng(0)
    for trial in range(5):
        lengths = rng.integers(90, 1900, size=40).tolist()
        sizes = sorted({sb.pad_to_block(n) for n in lengths})
        for count in (1, 2, 3, 4):
            chosen = sb.choose_token_buckets(lengths, count)
            assert len(chosen) == min(count, len(sizes)) and chosen[-1] == sizes[-1]
            brute = min(_padding(lengths, c) for c in itertools.combinations(sizes, min(count, len(sizes)))
                        if c[-1] == sizes[-1])
            assert _padding(lengths, chosen) == brute, (trial, count)
        # `longest` (a QA's tokens without event compression): the largest bucket holds it, the rest as before
        chosen = sb.choose_token_buckets(lengths, 3, longest=2900)
        brute = min(_padding(lengths, c + (2944,)) for c in itertools.combinations(sizes, 2))
        assert chosen[-1] == 2944 and _padding(lengths, chosen) == brute
    ladder = sb.token_ladder((256, 640, 896, 1920))
    assert ladder[:4] == (256, 640, 896, 1920) and ladder[4:] == tuple(b for b in sb.TOKEN_BUCKETS if b > 1920)
    with pytest.raises(sb.InputError, match="multiples of 128"):
        sb.token_ladder((100,))


def test_bucket_scan_reads_distinct_qas_up_to_its_limit():
    """`--token_buckets auto`'s scan: each QA name once, over-large QAs skipped, stops after `limit` names; the
    bound it returns is the largest second count (a QA's tokens without event compression). A checkpoint's record
    of the buckets serves a resumed run with the same flags."""
    from cogstream_jax.training import stage2_token_buckets as stb

    import types

    samples = [types.SimpleNamespace(video="v", chain_index=0, qa_index=i) for i in (0, 0, 1, 2)]
    tokens = {0: (100, 150, 70), 2: (300, 450, 20)}
    calls = []

    def measure(qas):
        calls.append([s.qa_index for s in qas])
        return [tokens.get(s.qa_index) for s in qas]  # QA 1 over-large

    assert stb.scan_lengths(samples, measure, limit=10) == ([100, 300], 450, 70)
    assert calls == [[0, 1, 2]]  # each QA once, in stream order
    assert stb.scan_lengths(samples, measure, limit=1) == ([100], 150, 70) and calls[-1] == [0]
    plan = stb.resolve(None, 2, 10, lambda: samples, measure)
    assert plan.chosen == (128, 512) and plan.ladder[:2] == (128, 512) and plan.answers == 256
    ladder = stb.parse("ladder", 2, 10)
    assert stb.resolve(ladder, 2, 10, lambda: samples, measure) == ladder and ladder.chosen == ()
    assert stb.parse("640,256", 2, 10).chosen == (256, 640)
    # a resumed run takes the plan its checkpoint recorded under the same flags, without scanning
    meta = {"token_buckets": stb.checkpoint_record("auto", 2, 10, plan)}
    assert stb.saved_plan(meta, "auto", 2, 10) == plan
    assert stb.saved_plan(meta, "auto", 3, 10) is None and stb.saved_plan({}, "auto", 2, 10) is None
    saved = stb.BucketPlan((256, 640), (256,), 64)
    assert stb.resolve(None, 2, 10, lambda: pytest.fail("scanned"), measure, saved=saved) == saved


def test_a_qa_over_the_largest_bucket_is_named():
    qa = _samples()[2]
    big = sb.FinalQA("vid chain 0 QA 7", np.zeros(sb.TOKEN_BUCKETS[-1] + 1, np.int64),
                     np.zeros(sb.TOKEN_BUCKETS[-1] + 1, np.int64), 4, 10)
    with pytest.raises(sb.OversizedQA, match="vid chain 0 QA 7"):
        sb.pack_call([qa, big], [0, 1], [None, None], row_weight=0.5)


def test_eval_segment_encoding_in_buckets_equals_the_packed_encoder():
    """Evaluation sessions encode clips in the same (frames, patches) buckets; features equal encode_visual."""
    from cogstream_jax.data.processor import Processor
    from cogstream_jax.data.synth import sample_dataset_dir
    from cogstream_jax.inference.segments import SegmentEncoder
    from cogstream_jax.model.vision import VisualLayout
    from cogstream_jax.reference_files import bundled_model_dir

    model = configs_model(0)
    processor = Processor.from_pretrained(bundled_model_dir())
    encoder = SegmentEncoder(model, processor, None)
    clip = sorted((sample_dataset_dir() / "event_segments" / "synth_0_000").glob("*.mp4"))[0]
    segments = encoder.encode_conversation([{"role": "user", "content": [
        {"type": "video", "video": {"video_path": str(clip), "fps": 1, "max_frames": 180}},
        {"type": "text", "text": "?"}]}])
    (segment,) = segments
    plans, probes = processor.plan_videos([{"role": "user", "content": [
        {"type": "video", "video": {"video_path": str(clip), "fps": 1, "max_frames": 180}}]}])
    decoded = encoder.decode(plans[0], probes[0])
    rows, grid = processor.encode_item(decoded, processor.target_sizes([decoded])[0])
    layout = VisualLayout.from_arrays([grid], [decoded.merge_size])
    reference = model.encode_visual(jax.numpy.asarray(rows), layout)
    assert segment.features.shape == reference.shape
    np.testing.assert_allclose(np.asarray(segment.features), np.asarray(reference), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("depth,workers", [(0, 1), (3, 1), (3, 3)])
def test_stream_skips_oversized_qas_by_name_prepares_own_rows_and_resumes_by_position(depth, workers, monkeypatch,
                                                                                     capsys):
    """A QA over the largest bucket is skipped with a warning naming it, in its place (its row stays empty, so no
    later QA moves to another row or process); positions this process does not own pass through unprepared; the
    stream's checkpoint state is the number of stream positions consumed, so a restored stream continues with the
    same QA (any mesh). Several workers preparing QAs at once change none of it."""
    from cogstream_jax.data.dataset import load_dataset
    from cogstream_jax.data.pipelines import Stage2Config, stage2_dataset
    from cogstream_jax.data.processor import Processor
    from cogstream_jax.data.synth import sample_dataset_dir
    from cogstream_jax.reference_files import bundled_model_dir
    from cogstream_jax.training.stage2_run import QAStream

    monkeypatch.setattr(sb, "TOKEN_BUCKETS", (256,))  # the sample's first QAs have ~200 tokens, later ones more
    processor = Processor.from_pretrained(bundled_model_dir(), cache_frames=4)
    dataset = load_dataset(sample_dataset_dir())
    make = lambda: stage2_dataset(dataset, Stage2Config(seed=0, num_epochs=1))  # noqa: E731
    stream = QAStream(make, processor, depth=depth, events=False, workers=workers)
    got = [next(stream) for _ in range(4)]
    assert [p for p, _ in got] == [0, 1, 2, 3] and all(isinstance(q, sb.FinalQA) for _, q in got)
    state = stream.get_state()
    fifth = next(stream)  # QAs 0-3 fit, QA 4 (~380 tokens) does not
    assert fifth[0] == 4 and isinstance(fifth[1], sb.OversizedQA) and "chain" in stream.dropped[0]
    assert "dropped stage-2 QA at stream position 4" in capsys.readouterr().err
    restored = QAStream(make, processor, depth=depth, events=False, workers=workers)
    restored.set_state(state)
    again = next(restored)
    assert again[0] == 4 and str(again[1]) == str(fifth[1])
    odd = QAStream(make, processor, depth=depth, events=False, workers=workers,
                       owns=lambda position: position % 2 == 1)
    mine = [next(odd) for _ in range(4)]
    assert [q is None for _, q in mine] == [True, False, True, False]
    assert mine[1][1].name == got[1][1].name and mine[3][1].name == got[3][1].name
    resumed = QAStream(make, processor, depth=depth, events=False, workers=workers,
                       owns=lambda position: position % 2 == 1)
    resumed.set_state(b'{"consumed": 3}')  # a resumed stream starts a device call: ownership counts from there
    after = [next(resumed) for _ in range(2)]
    assert [p for p, _ in after] == [3, 4] and after[0][1] is None and isinstance(after[1][1], sb.OversizedQA)
    for s in (stream, restored, odd, resumed):
        s.close()


@pytest.mark.parametrize("depth", [0, 2])
def test_stream_raises_a_failing_dataset_instead_of_waiting(depth):
    """An error of the dataset iterator itself reaches the consumer (the prefetch thread used to die silently,
    leaving the training loop waiting forever); positions not owned here pass through unprepared."""
    from cogstream_jax.training.stage2_run import QAStream

    def make():
        yield "a"
        yield "b"
        raise OSError("disk gone")

    stream = QAStream(make, None, depth=depth, events=False, owns=lambda position: False)
    assert [next(stream) for _ in range(2)] == [(0, None), (1, None)]
    with pytest.raises(OSError, match="disk gone"):
        next(stream)
    stream.close()



def test_collect_keeps_a_reading_error_for_the_call_and_lets_the_stream_end():
    """`stage2_calls.collect`: an error while reading a call's items is returned (with the items read before it),
    to be raised by `CallMaker.finals` once every process knows; the end of the stream is not an error."""
    from cogstream_jax.errors import InputError
    from cogstream_jax.training.stage2_calls import collect

    assert collect(iter([1, 2, 3]).__next__, 2) == ([1, 2], None)
    bad = InputError("clip.mp4: cannot be read as a video")

    def fail():
        raise bad

    reads = iter([lambda: 1, fail, lambda: 3])
    items, failed = collect(lambda: next(reads)(), 3)
    assert items == [1] and failed is bad  # the same error object, raised later with its own message
    with pytest.raises(StopIteration):
        collect(iter([1]).__next__, 2)
