"""Stage-1 (Historic Dialogue Retrieval) samples: items, the official augmentation, tokenised rows.

Official behaviour (protocol 4, train/first_stage_training.py), and where we differ:
- every QA with ID >= 1 is an item: current question, GT history pairs, relevance labels, is_visual;
- augmentation per item: ID 1 -> 1 sample; ID 2 -> original + reversed history; ID >= 3 -> original + 3 DISTINCT
  random permutations of the (Q, A, label) triples (the identity may be drawn). The official loop never ends
  when fewer than 3 distinct permutations exist (duplicate QAs); we then take all that exist (deviation);
- prompt = retrieval prompt with demos; target = `[yes|no,i,...]<|im_end|>` with the indices of label 1 in the
  (permuted) order; both tokenised separately without special tokens and concatenated; labels -100 on the prompt;
- over-long samples: the official code cuts the prompt from the RIGHT at 2048 tokens (losing the instruction and
  the assistant header); we instead drop the OLDEST history pairs and renumber the target (deviation).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from cogstream_jax.data.dataset import CogStreamDataset
from cogstream_jax.data.prompts import retrieval_prompt, retrieval_target
from cogstream_jax.errors import DataError

IGNORE_INDEX = -100
MAX_SAMPLES_PER_ITEM = 4


@dataclass(frozen=True)
class Stage1Item:
    video: str
    chain_index: int
    qa_id: int
    current_question: str
    history: tuple[tuple[str, str], ...]
    labels: tuple[int, ...]
    if_visual: bool


@dataclass(frozen=True)
class Stage1Sample:
    """One prompt/target pair; `order[j]` is the chronological index of the j-th rendered history pair."""

    item: Stage1Item
    order: tuple[int, ...]

    def history(self) -> list[tuple[str, str]]:
        return [self.item.history[i] for i in self.order]

    def target(self) -> str:
        return retrieval_target(self.item.if_visual, [j for j, i in enumerate(self.order) if self.item.labels[i]])

    def prompt(self) -> str:
        return retrieval_prompt(self.item.current_question, self.history(), with_demos=True)

    def without_oldest(self) -> "Stage1Sample":
        oldest = min(self.order)
        return Stage1Sample(self.item, tuple(i for i in self.order if i != oldest))


def stage1_items(dataset: CogStreamDataset) -> list[Stage1Item]:
    """All items in a fixed order (video, chain, position); the pipeline shuffles them with a seed."""
    items = []
    for video in dataset.videos:
        for chain in video.chains:
            for k, qa in enumerate(chain.qas):
                if qa.qa_id == 0:
                    continue
                history = tuple((p.question, p.answer) for p in chain.qas[:k])
                items.append(Stage1Item(video.name, chain.index, qa.qa_id, qa.question, history, qa.relevance,
                                        qa.is_visual))
    return items


def distinct_permutation_count(keys: Sequence[Any]) -> int:
    """Number of distinct orderings of a multiset: n! / prod(count!)."""
    total = math.factorial(len(keys))
    for count in Counter(keys).values():
        total //= math.factorial(count)
    return total


def _next_permutation(seq: list[int]) -> bool:
    """In-place lexicographic next permutation (multiset-aware); False when seq was the last one."""
    i = len(seq) - 2
    while i >= 0 and seq[i] >= seq[i + 1]:
        i -= 1
    if i < 0:
        return False
    j = len(seq) - 1
    while seq[j] <= seq[i]:
        j -= 1
    seq[i], seq[j] = seq[j], seq[i]
    seq[i + 1:] = reversed(seq[i + 1:])
    return True


def _all_distinct_orders(keys: list[int]) -> list[tuple[int, ...]]:
    """Every distinct ordering of positions whose triples differ (few by construction: <= 3)."""
    sorted_positions = sorted(range(len(keys)), key=lambda p: keys[p])
    pools: dict[int, list[int]] = {}
    for p in sorted_positions:
        pools.setdefault(keys[p], []).append(p)
    seq = sorted(keys)
    out = []
    while True:
        used = {k: iter(v) for k, v in pools.items()}
        out.append(tuple(next(used[k]) for k in seq))
        if not _next_permutation(seq):
            return out


def augment(item: Stage1Item, rng: np.random.Generator, n_shuffles: int = 3) -> list[Stage1Sample]:
    """The official augmentation, terminating when the history has fewer distinct permutations."""
    n = len(item.history)
    identity = tuple(range(n))
    if item.qa_id == 1 or n < 2:
        return [Stage1Sample(item, identity)]
    if item.qa_id == 2:
        return [Stage1Sample(item, identity), Stage1Sample(item, identity[::-1])]
    triples = [(q, a, item.labels[i]) for i, (q, a) in enumerate(item.history)]
    key_of = {t: k for k, t in enumerate(dict.fromkeys(triples))}
    keys = [key_of[t] for t in triples]
    seen: dict[tuple[int, ...], tuple[int, ...]] = {}  # content (keys in order) -> positions
    wanted = min(n_shuffles, distinct_permutation_count(keys))
    if wanted < n_shuffles:
        for order in _all_distinct_orders(keys):
            seen.setdefault(tuple(keys[p] for p in order), order)
    while len(seen) < wanted:
        order = tuple(int(p) for p in rng.permutation(n))
        seen.setdefault(tuple(keys[p] for p in order), order)
    return [Stage1Sample(item, identity)] + [Stage1Sample(item, order) for order in seen.values()]


@dataclass(frozen=True)
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]
    dropped_pairs: int


def tokenize_sample(sample: Stage1Sample, tokenizer: Any, max_length: int) -> TokenizedSample:
    """Prompt and target tokenised separately and concatenated; oldest pairs dropped until it fits."""
    dropped = 0
    while True:
        prompt = tokenizer(sample.prompt(), add_special_tokens=False)["input_ids"]
        target = tokenizer(sample.target(), add_special_tokens=False)["input_ids"]
        if len(prompt) + len(target) <= max_length:
            return TokenizedSample(list(prompt) + list(target), [IGNORE_INDEX] * len(prompt) + list(target), dropped)
        if not sample.order:
            it = sample.item
            raise DataError(
                f"QA_Dataset/{it.video}.json: [{it.chain_index}][{it.qa_id}].Q: the retrieval prompt needs "
                f"{len(prompt) + len(target)} tokens even without history (max_length {max_length})"
            )
        sample = sample.without_oldest()
        dropped += 1


def pad_rows(rows: Sequence[TokenizedSample], buckets: Sequence[int], pad_id: int) -> dict[str, np.ndarray]:
    """Stack 1-4 rows into [4, L] arrays, L = smallest bucket that fits; padding rows have row_mask False."""
    longest = max(len(r.input_ids) for r in rows)
    length = next((b for b in sorted(buckets) if b >= longest), None)
    if length is None:
        raise DataError(f"buckets: no padded length >= {longest} tokens (buckets {list(buckets)})")
    input_ids = np.full((MAX_SAMPLES_PER_ITEM, length), pad_id, np.int32)
    labels = np.full((MAX_SAMPLES_PER_ITEM, length), IGNORE_INDEX, np.int32)
    mask = np.zeros((MAX_SAMPLES_PER_ITEM, length), np.int32)
    for r, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[r, :n], labels[r, :n], mask[r, :n] = row.input_ids, row.labels, 1
    row_mask = np.arange(MAX_SAMPLES_PER_ITEM) < len(rows)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "row_mask": row_mask}
