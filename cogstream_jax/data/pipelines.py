"""grain pipelines for stage 1 (retrieval) and stage 2 (interleaved reasoning) training.

Both are deterministic for a seed, reshuffle every epoch, shard by process with explicit `grain.ShardOptions`
(pass `grain.sharding.ShardByJaxProcess()` in multi-host runs) and return grain iterators whose
`get_state()` / `set_state()` resume at the same element. Shuffling and per-element randomness (the stage-1
augmentation, the stage-2 chain draw) happen on GLOBAL indices before sharding, so the union of the shards is
exactly the unsharded stream and the result does not depend on the number of processes.

Stage 1 yields one element per item: `input_ids`, `labels`, `attention_mask` [4, L] and `row_mask` [4] (the 1, 2
or 4 augmented rows, like the official one-item-per-device-step collator), L from a small set of bucket lengths.
Stage 2 yields `Stage2Sample` records, one per QA of a chain drawn per video and epoch, over the growing
conversation with ground-truth answers (`data/stage2_samples.py`, which needs no grain); the processor decodes the
segments later.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import grain
import numpy as np

from cogstream_jax.data.dataset import CogStreamDataset, VideoRecord
from cogstream_jax.data.stage1 import (
    IGNORE_INDEX,
    Stage1Item,
    Stage1Sample,
    augment,
    pad_rows,
    stage1_items,
    tokenize_sample,
)
from cogstream_jax.data.tokens import PAD_ID
from cogstream_jax.data.stage2_samples import Stage2Config, Stage2Sample, stage2_episode
from cogstream_jax.errors import ConfigError

DEFAULT_BUCKETS = (512, 1024, 1536, 2048)


@dataclass(frozen=True)
class Stage1Config:
    seed: int = 42
    num_epochs: int | None = 1  # None repeats forever
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    max_length: int = 2048  # the official tokenizer max_length
    batch_size: int = 1  # items per batch (each item has 4 rows)
    augment: bool = True  # False: one row per item (the official collator's eval_mode)


def _shard(ds: grain.MapDataset, shard: grain.sharding.ShardOptions | None) -> grain.MapDataset:
    if shard is None:
        return ds
    if not 0 <= shard.shard_index < shard.shard_count:
        raise ConfigError(f"shard: shard_index {shard.shard_index} not in [0, {shard.shard_count})")
    if shard.drop_remainder and len(ds) < 2**62:
        ds = ds[: len(ds) // shard.shard_count * shard.shard_count]
    return ds[shard.shard_index :: shard.shard_count]


class _Stage1Transform:
    """Global item index -> augmented, tokenised, padded element (rng from grain's per-index seed)."""

    def __init__(self, items: Sequence[Stage1Item], tokenizer: Any, config: Stage1Config) -> None:
        self.items, self.tokenizer, self.config = items, tokenizer, config

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        item = self.items[index]
        samples = augment(item, rng) if self.config.augment else [Stage1Sample(item, tuple(range(len(item.history))))]
        rows = [tokenize_sample(s, self.tokenizer, self.config.max_length) for s in samples]
        element = pad_rows(rows, self.config.buckets, PAD_ID)
        element["item_index"] = np.int64(index)
        element["dropped_pairs"] = np.array([r.dropped_pairs for r in rows] + [0] * (4 - len(rows)), np.int32)
        return element


def _stack_padded(elements: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Batch items of different bucket lengths by padding to the longest bucket in the batch."""
    length = max(e["input_ids"].shape[-1] for e in elements)
    fill = {"input_ids": PAD_ID, "labels": IGNORE_INDEX, "attention_mask": 0}
    out = {}
    for key in elements[0]:
        values = [e[key] for e in elements]
        if key in fill:
            values = [np.pad(v, ((0, 0), (0, length - v.shape[-1])), constant_values=fill[key]) for v in values]
        out[key] = np.stack(values)
    return out


def stage1_dataset(
    dataset: CogStreamDataset,
    tokenizer: Any,
    config: Stage1Config = Stage1Config(),
    shard: grain.sharding.ShardOptions | None = None,
) -> grain.IterDataset:
    """Stage-1 elements (see module doc), batched by `config.batch_size` items."""
    if config.max_length > max(config.buckets):
        raise ConfigError(f"max_length: {config.max_length} exceeds the largest bucket {max(config.buckets)}")
    items = stage1_items(dataset)
    if not items:
        raise ConfigError(f"{dataset.root}: no QA with ID >= 1, nothing to train stage 1 on")
    transform = _Stage1Transform(items, tokenizer, config)
    ds = grain.MapDataset.range(len(items)).shuffle(seed=config.seed)
    ds = ds.random_map(lambda index, rng: transform(int(index), rng), seed=config.seed + 1)
    ds = ds.repeat(config.num_epochs)
    ds = _shard(ds, shard)
    return ds.to_iter_dataset().batch(config.batch_size, batch_fn=_stack_padded)


class _EpisodeToSamples(grain.experimental.FlatMapTransform):
    def __init__(self, videos: Sequence[VideoRecord], config: Stage2Config) -> None:
        self.videos, self.config = videos, config
        self.max_fan_out = max(len(c.qas) for v in videos for c in v.chains)

    def flat_map(self, element: tuple[int, int]) -> list[Stage2Sample]:
        video_index, chain_index = element
        return stage2_episode(self.videos[video_index], chain_index, self.config)


def stage2_dataset(
    dataset: CogStreamDataset,
    config: Stage2Config = Stage2Config(),
    shard: grain.sharding.ShardOptions | None = None,
) -> grain.IterDataset:
    """Stage-2 samples: videos shuffled per epoch, one chain drawn per video and epoch, one sample per QA."""
    videos = dataset.videos
    if not videos:
        raise ConfigError(f"{dataset.root}: no videos, nothing to train stage 2 on")
    ds = grain.MapDataset.range(len(videos)).shuffle(seed=config.seed)
    ds = ds.random_map(lambda i, rng: (int(i), int(rng.integers(len(videos[int(i)].chains)))), seed=config.seed + 1)
    ds = _shard(ds.repeat(config.num_epochs), shard)
    return grain.experimental.FlatMapIterDataset(ds.to_iter_dataset(), _EpisodeToSamples(videos, config))
