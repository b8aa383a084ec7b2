"""Count-based baselines for the language models: interpolated Kneser-Ney and add-one unigrams.

Scoring convention: the tokens of a text from position `first` on are scored, each given the
tokens before it in that text (up to order - 1 of them); seqlm.protocol passes the validation
tokens with the context in front of them, the same positions and text the RNNs are scored on.
Near the start of the text the context is shorter than order - 1 and the model uses the orders
it has.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from seqlm.ngrams import check_key_fits, count_ngrams, group_starts, pack

FALLBACK_DISCOUNT = 0.75


@dataclass(frozen=True)
class _Level:
    """One order k of the model: counts of k-grams (raw, or continuation counts for lower orders)
    by packed key, and per history (the first k-1 tokens) the total and the number of types."""
    keys: np.ndarray         # sorted packed k-gram keys with count > 0
    counts: np.ndarray
    discount: float
    hist_keys: np.ndarray    # sorted packed (k-1)-gram histories
    hist_total: np.ndarray   # sum of counts over the words that follow the history
    hist_types: np.ndarray   # number of distinct words that follow it: N1+(h .)

    @classmethod
    def build(cls, keys: np.ndarray, counts: np.ndarray, base: int) -> "_Level":
        # Ney's estimate D = n1 / (n1 + 2 n2) from this level's counts of counts; it lies in
        # (0, 1], which keeps every stored count >= D and so the interpolation normalised.
        n1, n2 = int(np.sum(counts == 1)), int(np.sum(counts == 2))
        discount = n1 / (n1 + 2 * n2) if n1 and n2 else FALLBACK_DISCOUNT
        hist = keys // base                       # sorted, since keys are
        starts = group_starts(hist)
        return cls(keys, counts, discount, hist[starts], np.add.reduceat(counts, starts),
                   np.diff(np.r_[starts, len(hist)]))

    def interpolate(self, hist: np.ndarray, words: np.ndarray, lower: np.ndarray,
                    base: int) -> np.ndarray:
        """P(w | h) = (max(c(hw) - D, 0) + D * N1+(h .) * P_lower(w)) / c(h .), or P_lower(w)
        where the history h was never seen."""
        count = _lookup(self.keys, self.counts, hist * base + words)
        total = _lookup(self.hist_keys, self.hist_total, hist)
        types = _lookup(self.hist_keys, self.hist_types, hist)
        seen = total > 0
        mixed = (np.maximum(count - self.discount, 0.0) + self.discount * types * lower) / \
            np.where(seen, total, 1)
        return np.where(seen, mixed, lower)


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """values[keys == q] for each q, 0 where q is absent (keys sorted)."""
    if not len(keys):
        return np.zeros(len(query), dtype=np.int64)
    at = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return np.where(keys[at] == query, values[at], 0)


class KneserNeyLM:
    """Interpolated Kneser-Ney over integer ids (Chen & Goodman 1998, one discount per order).

    The highest order available to a query uses raw counts; each lower order uses continuation
    counts N1+(. h w) (how many distinct tokens precede h w), which is what makes it Kneser-Ney;
    order 1 interpolates with the uniform distribution, so unseen tokens keep probability > 0.
    Every table is a sorted array of packed keys and lookups are np.searchsorted: no dicts.
    """

    def fit(self, train_ids: np.ndarray, vocab_size: int, order: int) -> "KneserNeyLM":
        if order < 1:
            raise ValueError(f"n-gram LM order must be >= 1, got {order}")
        check_key_fits(vocab_size, order)
        train_ids = _as_ids(train_ids, vocab_size, "training")
        tables = count_ngrams(train_ids, order, vocab_size, chunk_tokens=max(len(train_ids), 1))
        self.vocab_size, self.order = vocab_size, order
        self.raw = [_Level.build(tables[k].keys, tables[k].counts, vocab_size)
                    for k in range(1, order + 1)]
        # Continuation counts of k-grams from the distinct (k+1)-grams: drop their first token.
        self.continuation = []
        for k in range(1, order):
            suffixes, left_types = np.unique(tables[k + 1].keys % vocab_size**k, return_counts=True)
            self.continuation.append(_Level.build(suffixes, left_types, vocab_size))
        return self

    def _probs(self, history: list[np.ndarray], context_len: np.ndarray,
               words: np.ndarray) -> np.ndarray:
        """P(words[i] | last context_len[i] ids of the history columns, oldest column first)."""
        base = self.vocab_size
        probs = np.full(len(words), 1.0 / base)
        for k in range(1, self.order + 1):
            cols = history[len(history) - (k - 1):] if k > 1 else []
            hist = pack(cols, base) if cols else np.zeros(len(words), dtype=np.int64)
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
        history = [np.full(self.vocab_size, token) for token in context]
        return np.log(self._probs(history, np.full(self.vocab_size, len(context)), words))

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
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise ValueError(
            f"{what} ids must be a 1-D integer array, got shape {ids.shape} {ids.dtype}")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{what} ids must lie in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
    return ids
