"""Text metrics against published reference values (NLTK doctests on Papineni et al.) and hand computations."""
from __future__ import annotations

import math

import pytest

from cogstream_jax.scoring.nlp_metrics import (bleu, cider_d, corpus_bleu, lcs_length, nlp_report, rouge_l,
                                               token_f1, tokenize)

# Papineni et al. 2002 example, as in the NLTK bleu_score docstrings.
HYP1 = "It is a guide to action which ensures that the military always obeys the commands of the party".split()
REF1A = "It is a guide to action that ensures that the military will forever heed Party commands".split()
REF1B = ("It is the guiding principle which guarantees the military forces always being under the command of "
         "the Party").split()
REF1C = "It is the practical guide for the army always to heed the directions of the party".split()
HYP2 = "he read the book because he was interested in world history".split()
REF2A = "he was interested in world history because he read the book".split()


def test_bleu4_matches_nltk_published_sentence_value():
    # NLTK: sentence_bleu([ref1a, ref1b, ref1c], hyp1) == 0.5045666840058485 (true 4-gram, uniform weights)
    assert bleu(HYP1, [REF1A, REF1B, REF1C]) == pytest.approx(0.5045666840058485, abs=1e-15)


def test_official_weights_are_bleu2_not_bleu4():
    # The official step2c used weights (0.5, 0.5): exp(0.5 ln(17/18) + 0.5 ln(10/17)) = 0.7453559924999299.
    assert bleu(HYP1, [REF1A, REF1B, REF1C], max_order=2) == pytest.approx(0.7453559924999299, abs=1e-15)
    assert bleu(HYP1, [REF1A, REF1B, REF1C], max_order=2) != pytest.approx(bleu(HYP1, [REF1A, REF1B, REF1C]))


def test_corpus_bleu_matches_nltk_published_value():
    # NLTK corpus_bleu docstring example: 0.5920778868801042
    assert corpus_bleu([HYP1, HYP2], [[REF1A, REF1B, REF1C], [REF2A]]) == pytest.approx(0.5920778868801042,
                                                                                          abs=1e-15)


def test_bleu_zero_count_handling_and_smoothing():
    hyp, ref = "the cat sat".split(), "the cat ran".split()
    assert bleu(hyp, [ref]) == 0.0  # no trigram match: unsmoothed BLEU-4 is 0
    # method1: zero counts become 0.1; p = 2/3, 1/2, 0.1/1, and a 3-token hypothesis has no 4-grams: NLTK still
    # counts a denominator of 1 there (0.1/1), giving 0.24028 (nltk.translate.bleu_score, method1)
    expected = math.exp((math.log(2 / 3) + math.log(1 / 2) + 2 * math.log(0.1)) / 4)
    assert bleu(hyp, [ref], epsilon=0.1) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.24028, abs=1e-5)
    # corpus level: short hypotheses add 1 (not 0) to the 4-gram denominators
    short, longer = ("a red umbrella".split(), "a red umbrella .".split()), ("x y z w v".split(), "x y z w q".split())
    p = [(3 + 4) / (3 + 5), (2 + 3) / (2 + 4), (1 + 2) / (1 + 3), (0 + 1) / (1 + 2)]
    bp = math.exp(1 - 9 / 8)
    assert corpus_bleu([short[0], longer[0]], [[short[1]], [longer[1]]]) == pytest.approx(
        bp * math.exp(sum(math.log(x) for x in p) / 4), rel=1e-12)
    hyp4, ref4 = "a b c d".split(), "a b c e".split()
    expected = math.exp((math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2) + math.log(0.1 / 1)) / 4)
    assert bleu(hyp4, [ref4], epsilon=0.1) == pytest.approx(expected, rel=1e-12)
    # brevity penalty: hypothesis shorter than the reference
    assert bleu("a b c d".split(), ["a b c d e f".split()]) == pytest.approx(math.exp(1 - 6 / 4), rel=1e-12)


def test_rouge_l_hand_computed():
    hyp, ref = "the cat sat on mat".split(), "the cat was on the mat".split()
    assert lcs_length(hyp, ref) == 4  # the cat on mat
    p, r, beta = 4 / 5, 4 / 6, 1.2
    assert rouge_l(hyp, [ref]) == pytest.approx((1 + beta ** 2) * p * r / (r + beta ** 2 * p), rel=1e-12)
    assert rouge_l(hyp, [ref], beta=1.0) == pytest.approx(2 * p * r / (p + r), rel=1e-12)
    assert rouge_l(hyp, [hyp]) == pytest.approx(1.0)
    assert rouge_l(hyp, ["dog".split()]) == 0.0


def test_cider_d_hand_computed():
    # Two items, idf = log 2 for every n-gram. Item 1 identical ("a b"): unigram and bigram cosine 1, no 3/4-grams
    # -> mean(1,1,0,0) x10 = 5. Item 2 "c d" vs "c e": unigram cosine 1/2, bigram 0 -> 1.25. Corpus mean 3.125.
    mean, scores = cider_d([["a", "b"], ["c", "d"]], [[["a", "b"]], [["c", "e"]]])
    assert scores == pytest.approx([5.0, 1.25])
    assert mean == pytest.approx(3.125)


def test_cider_d_length_penalty():
    # Same n-grams cosine 1 for orders 1..2 with 1 extra token in the hypothesis -> Gaussian penalty exp(-1/72).
    hyps = [["a", "b", "a", "b"], ["x", "y"]]
    refs = [[["a", "b", "a"]], [["z", "w"]]]
    _, scores = cider_d(hyps, refs)
    assert scores[1] == 0.0
    # idf: every ref n-gram has df 1 -> log 2; hyp vectors unigram {a:2,b:2}L vs ref {a:2,b:1}L,
    # bigram hyp {ab:2, ba:1} vs ref {ab:1, ba:1}, trigram hyp {aba:1, bab:1} vs ref {aba:1}, 4-gram none in ref.
    uni = (2 * 2 + 1 * 1) / (math.sqrt(8) * math.sqrt(5))
    bi = (1 * 1 + 1 * 1) / (math.sqrt(5) * math.sqrt(2))
    tri = 1 / (math.sqrt(2) * 1)
    expected = (uni + bi + tri + 0) * math.exp(-1 / 72) / 4 * 10
    assert scores[0] == pytest.approx(expected, rel=1e-12)


def test_token_f1_and_tokenizer():
    assert tokenize("The Cat, sat.") == ["the", "cat", ",", "sat", "."]
    assert token_f1(["a", "b", "c"], ["a", "b", "d", "e"]) == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert token_f1(["a"], ["b"]) == 0.0


def test_nlp_report_names_metrics_honestly():
    report = nlp_report(["The umbrella is red."], ["The umbrella is red."])
    assert report["BLEU-4 (corpus)"] == pytest.approx(1.0)
    assert report["ROUGE-L"] == pytest.approx(1.0)
    assert report["METEOR"] is None and "WordNet" in report["METEOR_unavailable"]
    assert "BLEU-2 (sentence mean; the official step2c 'BLEU-4')" in report


def _lcs_table(a, b) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def test_bit_parallel_lcs_equals_the_dynamic_programming_table():
    import random

    rng = random.Random(7)
    for _ in range(500):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 30))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 30))]
        assert lcs_length(a, b) == _lcs_table(a, b)
