"""Kneser-Ney baseline: proper distributions, agreement with a plain-Python reference, and the
perplexities on the time machine split (train = first 10,000 char ids, validation = next 5,000)."""
from __future__ import annotations

import collections
import math

import numpy as np
import pytest

from seqlm.ngram_lm import KneserNeyLM, unigram_perplexity
from seqlm.text import Vocab, read_lines, tokenize

from conftest import REPO

V = 28


@pytest.fixture(scope="module")
def split() -> tuple[np.ndarray, np.ndarray]:
    tokens = tokenize(read_lines(REPO / "data" / "mirror" / "timemachine.txt"), "char")
    vocab = Vocab(tokens)
    assert len(vocab) == V
    ids = np.asarray([vocab[t] for line in tokens for t in line], dtype=np.int32)
    return ids[:10_000], ids[10_000:15_000]


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_next_token_distribution_is_proper(split, order: int) -> None:
    train, _ = split
    rng = np.random.default_rng(order)
    lm = KneserNeyLM().fit(train, V, order)
    # Random contexts of every length, most of them never seen in training.
    for length in [0, 1, 2, 3, 4, 5, 6] * 5:
        probs = np.exp(lm.log_probs_next(rng.integers(0, V, length)))
        assert abs(probs.sum() - 1) < 1e-9
        assert probs.min() > 0
    for context in (train[:order], train[-order - 3:]):        # seen contexts
        assert abs(np.exp(lm.log_probs_next(context)).sum() - 1) < 1e-9


@pytest.mark.parametrize("order", [1, 3, 5])
def test_unseen_tokens_keep_probability(order: int) -> None:
    train = np.array([1, 2, 3, 1, 2, 3, 1, 2, 4, 1, 2])       # tokens 0 and 5..7 never occur
    lm = KneserNeyLM().fit(train, 8, order)
    for context in ([], [1], [1, 2], [0, 0, 7, 6]):
        probs = np.exp(lm.log_probs_next(np.array(context, dtype=np.int64)))
        assert abs(probs.sum() - 1) < 1e-9
        assert probs[[0, 5, 6, 7]].min() > 0
    assert np.isfinite(lm.perplexity(np.array([0, 5, 7, 1, 2, 6])))
    tiny = KneserNeyLM().fit(np.array([1]), 3, order)          # shorter than the order
    assert abs(np.exp(tiny.log_probs_next(np.array([1, 1]))).sum() - 1) < 1e-9


def reference_probs(train: list[int], vocab_size: int, order: int, context: list[int],
                    words: list[int] | None = None) -> list[float]:
    """Interpolated Kneser-Ney written out with Counters: the definition the vectorised code must
    reproduce (raw counts at the highest order the context allows, continuation counts below,
    uniform at the bottom, D = n1 / (n1 + 2 n2) per order or 0.75). P(w | context) for each of
    `words` (all the vocabulary by default)."""
    raw = {k: collections.Counter(tuple(train[i:i + k]) for i in range(len(train) - k + 1))
           for k in range(1, order + 1)}
    cont = {k: collections.Counter(gram[1:] for gram in raw[k + 1]) for k in range(1, order)}

    def discount(table: collections.Counter) -> float:
        n1 = sum(c == 1 for c in table.values())
        n2 = sum(c == 2 for c in table.values())
        return n1 / (n1 + 2 * n2) if n1 and n2 else 0.75

    context = context[max(len(context) - (order - 1), 0):]
    levels = []                   # per k: the words that follow the history, and D
    for k in range(1, len(context) + 2):
        table = raw[k] if k == len(context) + 1 else cont[k]
        history = tuple(context[len(context) - (k - 1):]) if k > 1 else ()
        levels.append(({g[-1]: c for g, c in table.items() if g[:-1] == history},
                       discount(table)))
    probs = []
    for word in range(vocab_size) if words is None else words:
        p = 1 / vocab_size
        for following, d in levels:
            total = sum(following.values())
            if total:
                p = (max(following.get(word, 0) - d, 0) + d * len(following) * p) / total
        probs.append(p)
    return probs


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_matches_plain_python_reference(order: int) -> None:
    rng = np.random.default_rng(10 + order)
    train = rng.choice(5, size=120, p=[0.4, 0.3, 0.15, 0.1, 0.05]).tolist()
    lm = KneserNeyLM().fit(np.array(train), 6, order)          # token 5 never occurs
    for context in ([], [0], [1, 0], [2, 2, 1], [4, 3, 2, 1, 0], [5, 5], train[-5:]):
        got = np.exp(lm.log_probs_next(np.array(context, dtype=np.int64)))
        np.testing.assert_allclose(got, reference_probs(train, 6, order, context), rtol=1e-12)


@pytest.mark.parametrize("order", [1, 2, 5])
def test_perplexity_scores_every_token_but_the_first(split, order: int) -> None:
    train, val = split
    lm = KneserNeyLM().fit(train, V, order)
    text = val[:300]
    nll = [-lm.log_probs_next(text[max(0, i - order + 1):i])[text[i]] for i in range(1, len(text))]
    assert lm.perplexity(text) == pytest.approx(math.exp(np.mean(nll)), rel=1e-12)


def test_time_machine_validation_perplexities(split) -> None:
    train, val = split
    unigram = unigram_perplexity(train, val, V)
    kn = [KneserNeyLM().fit(train, V, order).perplexity(val) for order in range(1, 6)]
    assert kn[2] < unigram                                      # order 3 beats add-one unigrams
    assert kn == sorted(kn, reverse=True)                       # more context, lower perplexity
    # Recorded values (numpy, float64), so that a change in the estimator shows up here.
    assert unigram == pytest.approx(16.9426, rel=1e-4)
    assert kn == pytest.approx([16.9373, 9.8863, 6.9281, 5.5763, 5.2664], rel=1e-4)


def test_unigram_perplexity_is_add_one() -> None:
    # P = (count + 1) / (3 + 3) = (3/6, 2/6, 1/6); eval_ids[1:] = [0, 1] -> sqrt(1 / (1/2 * 1/3))
    ppl = unigram_perplexity(np.array([0, 0, 1]), np.array([2, 0, 1]), 3)
    assert ppl == pytest.approx(math.sqrt(6))


def test_bad_input_is_refused() -> None:
    ids = np.array([0, 1, 2, 1])
    with pytest.raises(ValueError, match="order must be >= 1, got 0"):
        KneserNeyLM().fit(ids, 3, 0)
    with pytest.raises(ValueError, match=r"training ids must lie in \[0, 2\), got 0..2"):
        KneserNeyLM().fit(ids, 2, 2)
    with pytest.raises(ValueError, match=r"4 training ids over a vocabulary of "
                                         r"4,611,686,018,427,387,904 tokens: n-gram codes"):
        KneserNeyLM().fit(ids, 2**62, 3)
    lm = KneserNeyLM().fit(ids, 3, 2)
    with pytest.raises(ValueError, match="a token of context and one to score: got 1 tokens"):
        lm.perplexity(np.array([1]))
    with pytest.raises(ValueError, match="got 4 tokens, scoring from position 4"):
        lm.perplexity(ids, first=4)
    with pytest.raises(ValueError, match="evaluated ids must be a 1-D integer array"):
        lm.perplexity(np.array([0.5, 1.0]))


def zipf_ids(rng: np.random.Generator, count: int, vocab: int) -> np.ndarray:
    weights = 1 / np.arange(1, vocab, dtype=np.float64)
    cdf = np.cumsum(weights)
    return np.searchsorted(cdf, rng.random(count) * cdf[-1]).astype(np.int64) + 1


def test_order_6_over_an_alphabet_of_400_symbols() -> None:
    """What a text of every character brings (clean: none): hundreds of symbols, uint16 ids."""
    rng = np.random.default_rng(6)
    train = zipf_ids(rng, 3_000, 400).astype(np.uint16)
    lm = KneserNeyLM().fit(train, 400, 6)
    listed = train.tolist()
    for context in ([], listed[:5], listed[-7:], listed[100:103], [399, 398, 397, 396, 395]):
        got = np.exp(lm.log_probs_next(np.array(context, dtype=np.uint16)))
        assert abs(got.sum() - 1) < 1e-9 and got.min() > 0
        np.testing.assert_allclose(got, reference_probs(listed, 400, 6, context), rtol=1e-12)
    same = KneserNeyLM().fit(train.astype(np.int64), 400, 6)
    text = zipf_ids(rng, 500, 400)
    assert lm.perplexity(text.astype(np.uint16)) == same.perplexity(text) < 400


def test_order_5_over_a_million_words() -> None:
    """Word ids up to 10**6: a 5-gram of them is 100 bits, and every order still works."""
    words = 10**6 + 1
    rng = np.random.default_rng(5)
    train = zipf_ids(rng, 4_000, words)
    train[50:55] = train[3000:3005] = words - 1             # the largest id, twice in a row
    lm = KneserNeyLM().fit(train.astype(np.int32), words, 5)
    listed = train.tolist()
    asked = sorted({*listed[:300], 0, 2, words - 1, words - 2})
    for context in ([], listed[46:50], listed[2996:3000], listed[10:14], [words - 1] * 4):
        got = np.exp(lm.log_probs_next(np.array(context)))
        assert abs(got.sum() - 1) < 1e-9 and got.min() > 0
        np.testing.assert_allclose(got[asked], reference_probs(listed, words, 5, context, asked),
                                   rtol=1e-12)
    held_out = zipf_ids(rng, 1_000, words)
    assert np.isfinite(lm.perplexity(held_out))
    assert lm.perplexity(train[:1000]) < lm.perplexity(held_out)   # it has seen the first
