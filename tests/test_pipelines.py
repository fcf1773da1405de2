"""grain pipelines: official stage-1 augmentation counts (1/2/4 by ID, terminating on duplicate histories),
targets tokenised with the real tokenizer and supervised only on the target, oldest-pair truncation,
bucketed shapes, determinism for a seed, disjoint and complete shards, and iterator state save/restore;
stage-2 records over the growing conversation with GT COI / is_visual."""
from __future__ import annotations

import dataclasses

import grain
import numpy as np
import pytest

from cogstream_jax.data.dataset import load_dataset
from cogstream_jax.data.pipelines import Stage1Config, Stage2Config, stage1_dataset, stage2_dataset, stage2_episode
from cogstream_jax.data.stage1 import (
    IGNORE_INDEX,
    Stage1Item,
    Stage1Sample,
    augment,
    distinct_permutation_count,
    tokenize_sample,
)
from cogstream_jax.data.synth import sample_dataset_dir
from cogstream_jax.data.tokens import GENERATION_PROMPT_IDS, IM_END_ID, PAD_ID

from real_processor_cache import real_processor, real_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return real_tokenizer()


@pytest.fixture(scope="module")
def dataset():
    return load_dataset(sample_dataset_dir())


@pytest.fixture(scope="module")
def one_video(dataset):
    """The first sample video only: enough items (~40) for the determinism and sharding checks, and faster."""
    return dataclasses.replace(dataset, videos=dataset.videos[:1])


def item(qa_id: int, history, labels=None, visual=True) -> Stage1Item:
    labels = tuple(labels if labels is not None else [i % 2 for i in range(len(history))])
    return Stage1Item("v", 0, qa_id, "Now?", tuple(history), labels, visual)


def pairs(n: int):
    return [(f"q{i}", f"a{i}") for i in range(n)]


def test_augmentation_counts_by_id():
    rng = np.random.default_rng(0)
    assert len(augment(item(1, pairs(1)), rng)) == 1
    two = augment(item(2, pairs(2), [1, 0]), rng)
    assert [s.order for s in two] == [(0, 1), (1, 0)]
    assert [s.target() for s in two] == ["[yes,0]<|im_end|>", "[yes,1]<|im_end|>"]  # labels follow the reversal
    for n in (3, 4, 7):
        samples = augment(item(n, pairs(n)), rng)
        assert len(samples) == 4 and samples[0].order == tuple(range(n))
        contents = {tuple(samples[0].item.history[i] for i in s.order) for s in samples[1:]}
        assert len(contents) == 3  # three DISTINCT shuffles (the identity may be one of them)


def test_augmentation_terminates_with_few_distinct_permutations():
    rng = np.random.default_rng(1)
    same = [("q", "a")] * 3
    assert distinct_permutation_count([0, 0, 0]) == 1
    assert len(augment(item(3, same, [1, 1, 1]), rng)) == 2  # original + the one distinct order
    two_kinds = [("q", "a"), ("q", "a"), ("r", "b")]
    samples = augment(item(3, two_kinds, [0, 0, 1]), rng)
    assert len(samples) == 4 and sorted(s.target() for s in samples[1:]) == [
        "[yes,0]<|im_end|>", "[yes,1]<|im_end|>", "[yes,2]<|im_end|>"]
    assert len(augment(item(5, [("q", "a")] * 20, [0] * 20), rng)) == 2  # no 20! enumeration


def test_rows_are_prompt_plus_target_with_labels_on_target_only(tokenizer):
    sample = Stage1Sample(item(3, pairs(3), [0, 1, 1], visual=False), (0, 1, 2))
    row = tokenize_sample(sample, tokenizer, 2048)
    prompt = tokenizer(sample.prompt(), add_special_tokens=False)["input_ids"]
    target = tokenizer("[no,1,2]<|im_end|>", add_special_tokens=False)["input_ids"]
    assert row.input_ids == prompt + target and row.dropped_pairs == 0
    assert row.labels == [IGNORE_INDEX] * len(prompt) + target
    assert prompt[-3:] == list(GENERATION_PROMPT_IDS) and target[-1] == IM_END_ID


def test_over_long_samples_drop_oldest_pairs_and_renumber(tokenizer):
    long_history = [(f"question {i} " + "word " * 60, f"answer {i}") for i in range(12)]
    labels = [1 if i in (0, 9, 11) else 0 for i in range(12)]
    sample = Stage1Sample(item(12, long_history, labels), tuple(range(12)))
    row = tokenize_sample(sample, tokenizer, 1200)
    assert len(row.input_ids) <= 1200 and row.dropped_pairs > 0
    kept = 12 - row.dropped_pairs
    expected_target = "[yes," + ",".join(str(i - row.dropped_pairs) for i in (9, 11)) + "]<|im_end|>"
    supervised = [t for t in row.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == expected_target
    text = tokenizer.decode(row.input_ids)
    assert f"question {row.dropped_pairs} " in text and f"question {row.dropped_pairs - 1} " not in text
    assert text.count("   A: ") == kept and "Generate a bracketed sequence" in text  # the instruction survives


def collect(ds) -> list[dict]:
    return list(iter(ds))


def test_stage1_counts_shapes_and_padding(dataset, tokenizer):
    batches = collect(stage1_dataset(dataset, tokenizer, Stage1Config(seed=0, batch_size=3)))
    by_item = {}
    for b in batches:
        assert b["input_ids"].shape[-1] in Stage1Config().buckets and b["input_ids"].shape[1] == 4
        assert np.all(b["labels"][b["attention_mask"] == 0] == IGNORE_INDEX)
        assert np.all(b["input_ids"][b["attention_mask"] == 0] == PAD_ID)
        for idx, rows in zip(b["item_index"], b["row_mask"]):
            by_item[int(idx)] = int(rows.sum())
    from cogstream_jax.data.stage1 import stage1_items
    items = stage1_items(dataset)
    assert sorted(by_item) == list(range(len(items)))
    for idx, n_rows in by_item.items():
        expected = {1: 1, 2: 2}.get(items[idx].qa_id, 4)
        if expected == 4:
            keys = [(q, a, l) for (q, a), l in zip(items[idx].history, items[idx].labels)]
            expected = 1 + min(3, distinct_permutation_count(keys))
        assert n_rows == expected
    assert {1, 2, 4} <= set(by_item.values())
    assert len({b["input_ids"].shape for b in batches}) <= 3


def test_stage1_same_seed_same_batches_other_seed_differs(one_video, tokenizer):
    dataset = one_video
    cfg = Stage1Config(seed=5, batch_size=2, num_epochs=2)
    first, second = collect(stage1_dataset(dataset, tokenizer, cfg)), collect(stage1_dataset(dataset, tokenizer, cfg))
    assert len(first) == len(second)
    for a, b in zip(first, second):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other = collect(stage1_dataset(dataset, tokenizer, Stage1Config(seed=6, batch_size=2)))
    assert [int(x) for b in other for x in b["item_index"]] != [int(x) for b in first[: len(other)] for x in b["item_index"]]
    n = len(first) // 2  # epoch 2 is reshuffled
    assert [int(x) for b in first[:n] for x in b["item_index"]] != [int(x) for b in first[n:] for x in b["item_index"]]


def test_stage1_shards_are_disjoint_and_complete(one_video, tokenizer):
    dataset = one_video
    cfg = Stage1Config(seed=3)
    full = [int(b["item_index"][0]) for b in collect(stage1_dataset(dataset, tokenizer, cfg))]
    shards = [
        [int(b["item_index"][0]) for b in collect(stage1_dataset(dataset, tokenizer, cfg, grain.sharding.ShardOptions(i, 2)))]
        for i in (0, 1)
    ]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(full)
    assert shards[0] == full[0::2] and shards[1] == full[1::2]
    even = collect(stage1_dataset(dataset, tokenizer, cfg, grain.sharding.ShardOptions(1, 2, drop_remainder=True)))
    assert len(even) == len(full) // 2


def test_stage1_iterator_state_resumes_at_same_element(one_video, tokenizer):
    dataset = one_video
    ds = stage1_dataset(dataset, tokenizer, Stage1Config(seed=9, batch_size=2))
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = iter(ds)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_stage2_records_follow_the_growing_conversation(dataset):
    video = dataset.video("synth_0_000")
    episode = stage2_episode(video, 0)
    chain = video.chains[0]
    assert len(episode) == len(chain.qas)
    for k, sample in enumerate(episode):
        conv = sample.conversation
        assert conv[0] == {"role": "system", "content": "You are a helpful assistant."}
        assert [m["role"] for m in conv[1:]] == ["user", "assistant"] * k + ["user"]
        assert [m["content"] for m in conv[2::2]] == [qa.answer for qa in chain.qas[:k]]  # GT answers
        videos = [c["video"]["video_path"] for m in conv if isinstance(m["content"], list) for c in m["content"]
                  if c["type"] == "video"]
        assert videos == list(sample.segment_paths)
        assert sample.coi == chain.qas[k].coi and sample.is_visual == chain.qas[k].is_visual
        assert sample.selection == "[" + ",".join(["yes" if sample.is_visual else "no", *map(str, sample.coi)]) + "]"
        assert sample.target == chain.qas[k].answer + "<|im_end|>"
    assert len(episode[-1].segment_paths) == len(video.segments)
    assert episode[0].conversation[1]["content"][0]["video"] == {
        "video_path": str(video.segments[0]), "fps": 1, "max_frames": 180}


def episodes(samples) -> list[tuple[str, int, int]]:
    """(video, chain, length) of each episode; every episode must run qa_index 0..n-1 in order."""
    out, current = [], []
    for s in samples:
        if s.qa_index == 0 and current:
            out.append(current)
            current = []
        current.append(s)
    out.append(current)
    for ep in out:
        assert [s.qa_index for s in ep] == list(range(len(ep))) and len({(s.video, s.chain_index) for s in ep}) == 1
    return [(ep[0].video, ep[0].chain_index, len(ep)) for ep in out]


def test_stage2_deterministic_sharded_and_resumable(dataset):
    cfg = Stage2Config(seed=1, num_epochs=2)
    full = list(stage2_dataset(dataset, cfg))
    assert full == list(stage2_dataset(dataset, cfg))
    eps = episodes(full)
    assert len(eps) == 6 and sorted(e[0] for e in eps[:3]) == sorted(e[0] for e in eps[3:]) == [v.name for v in dataset.videos]
    for video, chain, length in eps:
        assert length == len(dataset.video(video).chains[chain].qas)
    shards = [episodes(stage2_dataset(dataset, cfg, grain.sharding.ShardOptions(i, 2))) for i in (0, 1)]
    assert shards[0] == eps[0::2] and shards[1] == eps[1::2]  # disjoint and complete
    other = episodes(stage2_dataset(dataset, Stage2Config(seed=2, num_epochs=2)))
    assert other != eps
    it = iter(stage2_dataset(dataset, cfg))
    for _ in range(7):  # stop mid-episode
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(30)]
    resumed = iter(stage2_dataset(dataset, cfg))
    resumed.set_state(state)
    assert [next(resumed) for _ in range(30)] == expected


def test_stage2_inputs_rewrite_with_gt_and_supervise_only_the_answer(dataset):
    """Model-ready stage-2 inputs on real MP4s: the prompt is the official regex rewrite (gt selection) of the
    processor text, the answer + <|im_end|> is the only supervised part, frames survive only when visual."""
    from cogstream_jax.data.stage2 import stage2_inputs
    from official_rewrite_reference import official_rewrite

    processor = real_processor()
    video = dataset.video("synth_0_001")
    episode = stage2_episode(video, 0)
    picks = [episode[0], next(s for s in episode if s.coi and len(s.segment_paths) == 2),
             next(s for s in episode if not s.is_visual)]
    for sample in picks:
        inputs = stage2_inputs(sample, processor)
        out = inputs.processor_output
        text = processor(conversation=list(sample.conversation), return_text=True).text
        prior_qs = [q.question for q in video.chains[0].qas[: sample.qa_index]]
        prior_as = [q.answer for q in video.chains[0].qas[: sample.qa_index]]
        expected = official_rewrite(text, sample.is_visual, [prior_qs[i] for i in sample.coi],
                                    [prior_as[i] for i in sample.coi], sample.question)
        prompt_ids = processor.tokenizer(expected)["input_ids"]
        assert inputs.input_ids[: inputs.prompt_length].tolist() == prompt_ids
        supervised = inputs.labels[inputs.labels != IGNORE_INDEX].tolist()
        assert processor.tokenizer.decode(supervised) == sample.answer + "<|im_end|>"
        assert (inputs.labels[: inputs.prompt_length] == IGNORE_INDEX).all()
        n_image = int((inputs.input_ids == 151665).sum())
        assert inputs.kept_frames == (tuple(range(out.num_frames)) if sample.is_visual else ())
        per_frame = int(out.grid_sizes[0, 1] * out.grid_sizes[0, 2] // 4)
        assert n_image == per_frame * len(inputs.kept_frames)


def test_stage2_inputs_rewrite_the_first_qa_too(dataset):
    """forward_train rewrites every QA: a first QA with is_visual False loses all frames (inference would not)."""
    from cogstream_jax.data.stage2 import stage2_inputs

    first = stage2_episode(dataset.video("synth_0_000"), 0)[0]
    visual = stage2_inputs(first, real_processor())
    blind = stage2_inputs(dataclasses.replace(first, is_visual=False), real_processor())
    assert len(visual.kept_frames) == visual.processor_output.num_frames > 0
    assert blind.kept_frames == () and 151665 not in blind.input_ids.tolist()
    assert blind.rewrite.text.endswith(f"<|im_start|>user\n{first.question}<|im_end|>\n<|im_start|>assistant\n")


def test_stage1_without_augmentation_has_one_row_per_item(one_video, tokenizer):
    batches = collect(stage1_dataset(one_video, tokenizer, Stage1Config(seed=0, augment=False, batch_size=4)))
    rows = np.concatenate([b["row_mask"] for b in batches])
    assert rows[:, 0].all() and not rows[:, 1:].any()
