"""Count-based baselines for the language models: interpolated Kneser-Ney and add-one unigrams.

Scoring convention: the tokens of a text from position `first` on are scored, each given the
tokens before it in that text (up to order - 1 of them); seqlm.protocol passes the validation
tokens with the context in front of them, the same positions and text the RNNs are scored on.
Near the start of the text the context is shorter than order - 1 and the model uses the orders
it has.

Any vocabulary and any order: a k-gram of the training text is known by its code, the index of
its (k-1)-gram prefix among the distinct (k-1)-grams times the vocabulary size, plus its last id.
Codes stay below (training tokens + 1) x (vocabulary size) whatever k -- a billion tokens of a
million words take 60 bits -- where the k ids as one number in base V would need k x log2(V).
A query's history finds its index the same way, one id at a time.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAX_CODE = 2**63 - 1
FALLBACK_DISCOUNT = 0.75


@dataclass(frozen=True)
class _Level:
    """One order k of the model: counts of k-grams (raw, or continuation counts for lower orders)
    by code, and per history (its index among the (k-1)-grams) the total and the number of types
    of the words that follow it."""
    codes: np.ndarray        # sorted codes of the k-grams with count > 0
    counts: np.ndarray
    discount: float
    hist_total: np.ndarray   # by history index: sum of counts over the words that follow it
    hist_types: np.ndarray   # by history index: number of distinct words that follow: N1+(h .)

    @classmethod
    def build(cls, codes: np.ndarray, counts: np.ndarray, base: int, histories: int
              ) -> "_Level":
        kept = counts > 0
        codes, counts = codes[kept], counts[kept]
        # Ney's estimate D = n1 / (n1 + 2 n2) from this level's counts of counts; it lies in
        # (0, 1], which keeps every stored count >= D and so the interpolation normalised.
        n1, n2 = int(np.sum(counts == 1)), int(np.sum(counts == 2))
        discount = n1 / (n1 + 2 * n2) if n1 and n2 else FALLBACK_DISCOUNT
        # One more entry past the histories, 0: where a history is -1 (never seen).
        history = codes // base
        total = np.zeros(histories + 1, dtype=np.int64)
        np.add.at(total, history, counts)
        return cls(codes, counts, discount, total,
                   np.bincount(history, minlength=histories + 1).astype(np.int64))

    def interpolate(self, hist: np.ndarray, words: np.ndarray, lower: np.ndarray,
                    base: int) -> np.ndarray:
        """P(w | h) = (max(c(hw) - D, 0) + D * N1+(h .) * P_lower(w)) / c(h .), or P_lower(w)
        where the history h (an index, -1: never seen) was never followed by a word."""
        count = _lookup(self.codes, self.counts, hist * base + words, hist >= 0)
        total, types = self.hist_total[hist], self.hist_types[hist]
        seen = total > 0
        mixed = (np.maximum(count - self.discount, 0.0) + self.discount * types * lower) / \
            np.where(seen, total, 1)
        return np.where(seen, mixed, lower)


def _lookup(codes: np.ndarray, values: np.ndarray, query: np.ndarray, valid: np.ndarray
            ) -> np.ndarray:
    """values[codes == q] for each valid q, 0 where q is absent (codes sorted)."""
    found = _find(codes, query, valid)
    return np.where(found >= 0, values[found], 0) if len(codes) else \
        np.zeros(found.shape, dtype=np.int64)


def _find(codes: np.ndarray, query: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Index of each valid query in sorted `codes`, -1 where it is absent or not valid."""
    if not len(codes):
        return np.full(np.shape(query), -1, dtype=np.int64)
    at = np.minimum(np.searchsorted(codes, query), len(codes) - 1)
    return np.where(valid & (codes[at] == query), at, -1)


class KneserNeyLM:
    """Interpolated Kneser-Ney over integer ids (Chen & Goodman 1998, one discount per order).

    The highest order available to a query uses raw counts; each lower order uses continuation
    counts N1+(. h w) (how many distinct tokens precede h w), which is what makes it Kneser-Ney;
    order 1 interpolates with the uniform distribution, so unseen tokens keep probability > 0.
    Every table is a sorted array of codes (see the module docstring) and lookups are
    np.searchsorted: no dicts.
    """

    def fit(self, train_ids: np.ndarray, vocab_size: int, order: int) -> "KneserNeyLM":
        if order < 1:
            raise ValueError(f"n-gram LM order must be >= 1, got {order}")
        train_ids = _as_ids(train_ids, vocab_size, "training")
        if (len(train_ids) + 1) * vocab_size - 1 > MAX_CODE:
            raise ValueError(f"{len(train_ids):,} training ids over a vocabulary of "
                             f"{vocab_size:,} tokens: n-gram codes (tokens x vocabulary) would "
                             "pass 2**63; train on fewer tokens")
        self.vocab_size, self.order = vocab_size, order
        # codes[k]: the distinct k-grams' codes, sorted (an index is a rank); suffix[k]: the
        # index in level k-1 of each k-gram's last k-1 ids. Level 0 is the empty n-gram.
        self.codes: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        counts, suffix = [np.array([len(train_ids)])], [np.zeros(1, dtype=np.int64)]
        index = np.zeros(len(train_ids) + 1, dtype=np.int64)   # each window's (k-1)-gram
        for k in range(1, order + 1):
            windows = max(len(train_ids) - k + 1, 0)
            previous = index
            level, index, level_counts = np.unique(
                previous[:windows] * vocab_size + train_ids[k - 1:k - 1 + windows],
                return_inverse=True, return_counts=True)
            # The suffix of the k-gram at position i is the (k-1)-gram at i + 1.
            level_suffix = np.zeros(len(level), dtype=np.int64)
            if k > 1:
                level_suffix[index] = previous[1:windows + 1]
            self.codes.append(level)
            counts.append(level_counts.astype(np.int64))
            suffix.append(level_suffix)
        self.raw = [_Level.build(self.codes[k], counts[k], vocab_size, len(self.codes[k - 1]))
                    for k in range(1, order + 1)]
        # Continuation counts of k-grams: how many distinct (k+1)-grams end with them.
        self.continuation = [
            _Level.build(self.codes[k], np.bincount(suffix[k + 1], minlength=len(self.codes[k])),
                         vocab_size, len(self.codes[k - 1]))
            for k in range(1, order)]
        return self

    def _history_index(self, columns: Sequence[np.ndarray]) -> np.ndarray:
        """The index among the training text's len(columns)-grams of the n-gram the columns
        spell (oldest first), -1 where it never occurs."""
        index = np.zeros(1, dtype=np.int64)
        for k, column in enumerate(columns, start=1):
            seen = index >= 0
            index = _find(self.codes[k], np.where(seen, index, 0) * self.vocab_size + column,
                          seen)
        return index

    def _probs(self, history: list[np.ndarray], context_len: np.ndarray,
               words: np.ndarray) -> np.ndarray:
        """P(words[i] | last context_len[i] ids of the history columns, oldest column first)."""
        base = self.vocab_size
        probs = np.full(len(words), 1.0 / base)
        for k in range(1, self.order + 1):
            hist = self._history_index(history[len(history) - (k - 1):] if k > 1 else [])
            raw = self.raw[k - 1].interpolate(hist, words, probs, base)
            lower = self.continuation[k - 1].interpolate(hist, words, probs, base) \
                if k < self.order else raw
            probs = np.where(context_len == k - 1, raw, np.where(context_len > k - 1, lower, probs))
        return probs

    def log_probs_next(self, context_ids: np.ndarray) -> np.ndarray:
        """log P(w | context) for every w in the vocabulary, shape (V,); only the last order - 1
        ids of the context matter."""
        context = _as_ids(context_ids, self.vocab_size, "context")
        context = context[max(len(context) - (self.order - 1), 0):]
        words = np.arange(self.vocab_size)
        history = [np.full(1, token) for token in context]       # broadcast over the words
        return np.log(self._probs(history, np.full(1, len(context)), words))

    def token_log_probs(self, ids: np.ndarray, first: int = 1) -> np.ndarray:
        """log P(ids[i] | ids[max(0, i-order+1):i]) for i = first..len(ids)-1, in order."""
        ids = _as_ids(ids, self.vocab_size, "evaluated")
        _check_scored(len(ids), first)
        padded = np.concatenate([np.zeros(self.order - 1, dtype=np.int64), ids])
        positions = np.arange(first, len(ids))
        # Column j holds the token order - 1 - j places before each position (padding if < 0).
        history = [padded[first + j:j + len(ids)] for j in range(self.order - 1)]
        probs = self._probs(history, np.minimum(positions, self.order - 1), ids[first:])
        return np.log(probs)

    def perplexity(self, ids: np.ndarray, first: int = 1) -> float:
        """exp(mean -log P) over the tokens from position `first` on."""
        return float(np.exp(-np.mean(self.token_log_probs(ids, first))))


def unigram_log_probs(train_ids: np.ndarray, ids: np.ndarray, vocab_size: int,
                      first: int = 1) -> np.ndarray:
    """log P(ids[i]) for i = first..len(ids)-1 under add-one smoothed unigram frequencies of
    train_ids (the same positions as KneserNeyLM.token_log_probs)."""
    train_ids = _as_ids(train_ids, vocab_size, "training")
    ids = _as_ids(ids, vocab_size, "evaluated")
    _check_scored(len(ids), first)
    probs = (np.bincount(train_ids, minlength=vocab_size) + 1) / (len(train_ids) + vocab_size)
    return np.log(probs[ids[first:]])


def unigram_perplexity(train_ids: np.ndarray, ids: np.ndarray, vocab_size: int,
                       first: int = 1) -> float:
    return float(np.exp(-np.mean(unigram_log_probs(train_ids, ids, vocab_size, first))))


def _check_scored(n_tokens: int, first: int) -> None:
    if not 1 <= first < n_tokens:
        raise ValueError(f"perplexity needs a token of context and one to score: got {n_tokens} "
                         f"tokens, scoring from position {first}")


def _as_ids(ids: np.ndarray, vocab_size: int, what: str) -> np.ndarray:
    """The ids as int64, whatever their integer dtype (uint8, uint16, int32, ...)."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise ValueError(
            f"{what} ids must be a 1-D integer array, got shape {ids.shape} {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{what} ids must lie in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
    return ids.astype(np.int64)
