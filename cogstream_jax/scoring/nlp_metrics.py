"""Reference-based text metrics written in pure Python, named for what they compute.

- BLEU-4: uniform 4-gram weights (0.25 each), modified n-gram precision with clipping, brevity penalty against
  the closest reference length (ties to the shorter) - Papineni et al. 2002 as NLTK computes it. The official
  step2c passed weights (0.5, 0.5), i.e. BLEU-2, under the name "BLEU-4"; `bleu(..., max_order=2)` is that.
- ROUGE-L: longest-common-subsequence F-measure as pycocoevalcap's `Rouge` (beta 1.2, best P and R over refs).
- CIDEr-D: pycocoevalcap's `Cider` (tf-idf n-grams 1..4 with document frequencies over the references of the
  scored set, clipped similarity, Gaussian length penalty sigma 6, x10).
- METEOR: not available - it needs WordNet synonym data (NLTK) or the Java METEOR jar, neither of which can be
  installed offline here.
"""
from __future__ import annotations

import functools
import math
import re
from collections import Counter
from typing import Sequence

_TOKEN = re.compile(r"\w+|[^\w\s]")
_WORD = re.compile(r"\w+")
METEOR_UNAVAILABLE = ("METEOR needs WordNet data (nltk.download('wordnet')) or the METEOR 1.5 Java jar; neither is "
                      "installed and there is no network, so it is not computed")


def tokenize(text: str) -> list[str]:
    """Lower-cased words and punctuation marks (stand-in for NLTK word_tokenize, which is not installed)."""
    return _TOKEN.findall(text.lower())


def words(text: str) -> list[str]:
    """Lower-cased words only: punctuation and casing never change a similarity judgement."""
    return _WORD.findall(text.lower())


@functools.lru_cache(maxsize=1 << 17)
def _ngram_counts(tokens: tuple[str, ...], order: int) -> Counter:
    return Counter(tokens[i:i + order] for i in range(len(tokens) - order + 1))


def ngram_counts(tokens: Sequence[str], order: int) -> Counter:
    """n-gram counts (memoised: every metric of a report counts the same sentences); do not mutate."""
    return _ngram_counts(tuple(tokens), order)


def _clipped_matches(hypothesis: Sequence[str], references: Sequence[Sequence[str]], order: int) -> tuple[int, int]:
    counts = ngram_counts(hypothesis, order)
    max_ref = ngram_counts(references[0], order) if len(references) == 1 else Counter()
    for reference in references if len(references) > 1 else ():
        max_ref |= ngram_counts(reference, order)
    # NLTK's modified precision counts at least 1 hypothesis n-gram, so a hypothesis shorter than `order` gives
    # 0/1 there (then smoothed), not an undefined precision
    return sum(min(count, max_ref[gram]) for gram, count in counts.items()), max(len(hypothesis) - order + 1, 1)


def _closest_ref_length(hyp_len: int, references: Sequence[Sequence[str]]) -> int:
    return min((abs(len(ref) - hyp_len), len(ref)) for ref in references)[1]


def _bleu_from_counts(matches: list[int], totals: list[int], hyp_len: int, ref_len: int, epsilon: float) -> float:
    if hyp_len == 0 or matches[0] == 0:
        return 0.0
    log_sum = 0.0
    for match, total in zip(matches, totals):
        if match == 0:
            if epsilon <= 0:
                return 0.0
            match = epsilon  # NLTK SmoothingFunction().method1
        log_sum += math.log(match / total) / len(matches)
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_sum)


def bleu(hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_order: int = 4,
         epsilon: float = 0.0) -> float:
    """Sentence BLEU with uniform weights over orders 1..max_order; `epsilon` > 0 smooths zero counts."""
    pairs = [_clipped_matches(hypothesis, references, n) for n in range(1, max_order + 1)]
    return _bleu_from_counts([m for m, _ in pairs], [t for _, t in pairs], len(hypothesis),
                             _closest_ref_length(len(hypothesis), references), epsilon)


def corpus_bleu(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
                max_order: int = 4) -> float:
    """Corpus BLEU: n-gram matches, totals and lengths summed over sentences before combining."""
    matches, totals = [0] * max_order, [0] * max_order
    hyp_len = ref_len = 0
    for hypothesis, refs in zip(hypotheses, references):
        for n in range(max_order):
            match, total = _clipped_matches(hypothesis, refs, n + 1)
            matches[n] += match
            totals[n] += total
        hyp_len += len(hypothesis)
        ref_len += _closest_ref_length(len(hypothesis), refs)
    return _bleu_from_counts(matches, totals, hyp_len, ref_len, 0.0)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence length, bit-parallel over `b` (Hyyrö 2004): one big-int step per token of `a`."""
    masks: dict[str, int] = {}
    for index, token in enumerate(b):
        masks[token] = masks.get(token, 0) | (1 << index)
    full = (1 << len(b)) - 1
    row = full
    for token in a:
        matched = row & masks.get(token, 0)
        row = ((row + matched) | (row - matched)) & full
    return len(b) - bin(row).count("1")


def rouge_l(hypothesis: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    """ROUGE-L F-measure with the best precision and recall over the references (pycocoevalcap)."""
    if not hypothesis or not references:
        return 0.0
    precision = recall = 0.0
    for reference in references:
        lcs = lcs_length(hypothesis, reference)
        precision = max(precision, lcs / len(hypothesis))
        recall = max(recall, lcs / len(reference) if reference else 0.0)
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)


def token_f1(hypothesis: Sequence[str], reference: Sequence[str]) -> float:
    """SQuAD-style bag-of-tokens F1."""
    common = sum((Counter(hypothesis) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(hypothesis), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def _cider_vector(tokens: Sequence[str], idf: dict[tuple[str, ...], float], log_n_docs: float, max_order: int):
    """tf-idf vectors per order; an n-gram absent from every reference gets df 1, i.e. idf log(N)."""
    vectors, norms = [], []
    for n in range(1, max_order + 1):
        vec = {gram: count * idf.get(gram, log_n_docs) for gram, count in ngram_counts(tokens, n).items()}
        vectors.append(vec)
        norms.append(math.sqrt(sum(v * v for v in vec.values())))
    return vectors, norms, max(len(tokens) - 1, 0)  # pycocoevalcap measures length in bigrams


def cider_d(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
            max_order: int = 4, sigma: float = 6.0) -> tuple[float, list[float]]:
    """(corpus mean, per-item scores) of CIDEr-D as pycocoevalcap computes it (0..10 scale)."""
    doc_freq: Counter = Counter()
    for refs in references:
        doc_freq.update({gram for ref in refs for n in range(1, max_order + 1) for gram in ngram_counts(ref, n)})
    log_n_docs = math.log(float(len(references))) if references else 0.0
    idf = {gram: log_n_docs - math.log(max(1.0, count)) for gram, count in doc_freq.items()}
    scores = []
    for hypothesis, refs in zip(hypotheses, references):
        hyp_vec, hyp_norm, hyp_len = _cider_vector(hypothesis, idf, log_n_docs, max_order)
        total = [0.0] * max_order
        for ref in refs:
            ref_vec, ref_norm, ref_len = _cider_vector(ref, idf, log_n_docs, max_order)
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * sigma ** 2))
            for n in range(max_order):
                value = sum(min(v, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, v in hyp_vec[n].items())
                if hyp_norm[n] and ref_norm[n]:
                    value /= hyp_norm[n] * ref_norm[n]
                total[n] += value * penalty
        scores.append(sum(total) / max_order / len(refs) * 10.0 if refs else 0.0)
    return (sum(scores) / len(scores) if scores else 0.0), scores


def nlp_report(predictions: Sequence[str], answers: Sequence[str]) -> dict:
    """Corpus-level text metrics of predictions against the single GT answer of each QA."""
    hyps = [tokenize(text) for text in predictions]
    refs = [[tokenize(text)] for text in answers]
    n = len(hyps)
    cider_mean, _ = cider_d(hyps, refs)
    return {
        "n_qas": n,
        "tokenizer": "lower-cased regex words and punctuation (\\w+|[^\\w\\s])",
        "BLEU-4 (corpus)": corpus_bleu(hyps, refs),
        "BLEU-4 (sentence mean, smoothing method1)": sum(bleu(h, r, epsilon=0.1) for h, r in zip(hyps, refs)) / n
        if n else 0.0,
        "BLEU-2 (sentence mean; the official step2c 'BLEU-4')": sum(bleu(h, r, max_order=2)
                                                                   for h, r in zip(hyps, refs)) / n if n else 0.0,
        "ROUGE-L": sum(rouge_l(h, r) for h, r in zip(hyps, refs)) / n if n else 0.0,
        "CIDEr-D": cider_mean,
        "METEOR": None,
        "METEOR_unavailable": METEOR_UNAVAILABLE,
    }
