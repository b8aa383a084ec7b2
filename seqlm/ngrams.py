"""Vectorised, streaming n-gram counting over a token-id sequence (D2L 8.3.3).

Each window of n ids is packed into one int64 key (a number in base `vocab_size`), so counting is
a sort of integers: no tuple per n-gram. The sequence is read in chunks (a memory-mapped .npy
works), each chunk is reduced to a table (key, count, first position) and merged into the running
table, so memory grows with the number of distinct n-grams, not with the corpus.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure

from seqlm.io import atomic_path

MAX_KEY = 2**63 - 1


class NgramError(ValueError):
    """The ids or the order cannot be counted (an id outside the vocabulary, a key overflow)."""


def check_key_fits(vocab_size: int, n: int) -> None:
    """Packed n-gram keys are base-`vocab_size` numbers of n digits; they must fit an int64."""
    if vocab_size < 1:
        raise NgramError(f"vocabulary size must be >= 1, got {vocab_size}")
    if vocab_size**n - 1 > MAX_KEY:
        raise NgramError(
            f"{n}-grams over a vocabulary of {vocab_size} tokens do not fit a 63-bit key "
            f"({vocab_size}**{n} > 2**63); use a smaller n")


def pack(windows: Sequence[np.ndarray], base: int) -> np.ndarray:
    """Keys of aligned id columns: windows[0] is the most significant (first) token."""
    keys = np.zeros(len(windows[0]) if windows else 0, dtype=np.int64)
    for column in windows:
        keys = keys * base + column
    return keys


def unpack(keys: np.ndarray, n: int, base: int) -> np.ndarray:
    """(len(keys), n) array of the ids packed in `keys`."""
    ids = np.empty((len(keys), n), dtype=np.int64)
    rest = keys.astype(np.int64, copy=True)
    for j in range(n - 1, -1, -1):
        rest, ids[:, j] = np.divmod(rest, base)
    return ids


def group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Index of the first element of each run of equal values in sorted non-negative keys."""
    return np.flatnonzero(np.diff(sorted_keys, prepend=-1))


@dataclass(frozen=True)
class NgramTable:
    """Distinct n-grams as packed keys with their counts and first positions in the corpus."""
    n: int
    keys: np.ndarray     # int64
    counts: np.ndarray   # int64
    first: np.ndarray    # int64, start position of the first occurrence

    @classmethod
    def empty(cls, n: int) -> "NgramTable":
        return cls(n, *(np.empty(0, dtype=np.int64) for _ in range(3)))

    def __len__(self) -> int:
        return len(self.keys)

    def merge(self, keys: np.ndarray, counts: np.ndarray, first: np.ndarray) -> "NgramTable":
        """This table plus sorted, distinct (keys, counts, first) entries; an n-gram in both gets
        the sum of the counts and the earlier first position."""
        keys = np.concatenate([self.keys, keys])
        counts = np.concatenate([self.counts, counts])
        first = np.concatenate([self.first, first])
        # Both inputs are sorted by key: a stable sort (timsort) merges two runs in ~linear time.
        order = np.argsort(keys, kind="stable")
        keys, counts, first = keys[order], counts[order], first[order]
        starts = group_starts(keys)
        return NgramTable(self.n, keys[starts], np.add.reduceat(counts, starts),
                          np.minimum.reduceat(first, starts))

    def ranked(self) -> "NgramTable":
        """Sorted by count descending, ties by first appearance: what the seed's Counter plus
        stable sort gives."""
        order = rank_order(self.counts, self.first)
        return NgramTable(self.n, self.keys[order], self.counts[order], self.first[order])


def rank_order(counts: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Indices that sort by count descending, then first position ascending.

    When (count, first, index) fit the 63 bits of one int64 (always for corpora of up to 2**21
    tokens, and far beyond in practice: counts and distinct n-grams are much fewer than tokens)
    they are packed and np.sort-ed, about ten times faster than lexsort, which is the fallback.
    """
    if not len(counts):
        return np.empty(0, dtype=np.int64)
    top = int(counts.max())
    first_bits, index_bits = int(first.max()).bit_length(), (len(counts) - 1).bit_length()
    if top.bit_length() + first_bits + index_bits > 63:
        return np.lexsort((first, -counts))
    packed = ((top - counts) << (first_bits + index_bits)) | (first << index_bits)
    return np.sort(packed | np.arange(len(counts), dtype=np.int64)) & ((1 << index_bits) - 1)


def count_ngrams(ids: np.ndarray, max_n: int, vocab_size: int,
                 chunk_tokens: int = 1_000_000) -> dict[int, NgramTable]:
    """n-gram tables for n = 1..max_n over `ids` (1-D, may be a memory map), sorted by key
    (`.ranked()` gives the frequency order).

    Chunk c holds the windows starting at positions [c*chunk, (c+1)*chunk); it reads max_n - 1
    extra ids past its end, so windows that cross a chunk border are counted exactly once.
    """
    if max_n < 1 or chunk_tokens < 1:
        raise NgramError(f"max_n={max_n} and chunk_tokens={chunk_tokens} must be >= 1")
    for n in range(1, max_n + 1):
        check_key_fits(vocab_size, n)
    chunk_tokens = min(chunk_tokens, _max_chunk(vocab_size))
    total = len(ids)
    tables = {n: NgramTable.empty(n) for n in range(1, max_n + 1)}
    for start in range(0, total, chunk_tokens):
        chunk = np.asarray(ids[start:start + chunk_tokens + max_n - 1])
        _check_ids(chunk, vocab_size, start)
        windows = [min(chunk_tokens, total - n + 1 - start) for n in range(1, max_n + 1)]
        for n, (keys, counts, first) in enumerate(_count_chunk(chunk, windows, vocab_size), 1):
            tables[n] = tables[n].merge(keys, counts, first + start)
    return tables


def _max_chunk(base: int) -> int:
    """Largest chunk whose chunk-local keys, shifted to hold a position, still fit an int64."""
    return 1 << ((62 - base.bit_length()) // 2)


def _count_chunk(chunk: np.ndarray, windows: list[int], base: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(keys, counts, first positions) of the distinct n-grams of one chunk, sorted by key, for
    n = 1, 2, ... with windows[n-1] windows of each n.

    Sorting dominates the cost, and np.sort of plain int64 runs several times faster than argsort.
    So each window gets a small chunk-local key -- the rank of its (n-1)-gram prefix among the
    chunk's distinct (n-1)-grams, times base, plus its last id -- that leaves room for the window's
    position in the low bits: one np.sort then gives the groups and each group's first position.
    Ranks keep lexicographic order, so groups come out in the order of the packed keys.
    """
    chunk = chunk.astype(np.int64, copy=False)
    pos_bits = max(windows[0], 1).bit_length()
    prefix_rank = np.zeros(max(windows[0], 0), dtype=np.int64)   # the empty prefix of unigrams
    prefix_keys = np.zeros(1, dtype=np.int64)
    for n, count in enumerate(windows, 1):
        if count <= 0:
            return
        local = prefix_rank[:count] * base + chunk[n - 1:n - 1 + count]
        ordered = np.sort((local << pos_bits) | np.arange(count, dtype=np.int64))
        local, pos = ordered >> pos_bits, ordered & ((1 << pos_bits) - 1)
        is_start = np.diff(local, prepend=-1) != 0
        starts = np.flatnonzero(is_start)
        first = pos[starts]
        prefix_rank = np.empty(count, dtype=np.int64)
        prefix_rank[pos] = np.cumsum(is_start) - 1
        local = local[starts]
        prefix_keys = prefix_keys[local // base] * base + local % base   # packed keys, rank order
        yield prefix_keys, np.diff(np.r_[starts, count]), first


def _check_ids(chunk: np.ndarray, vocab_size: int, offset: int) -> None:
    if chunk.dtype.kind not in "iu":
        raise NgramError(f"token ids must be integers, got dtype {chunk.dtype}")
    bad = np.flatnonzero((chunk < 0) | (chunk >= vocab_size))
    if len(bad):
        raise NgramError(f"token id {int(chunk[bad[0]])} at position {offset + int(bad[0])} is "
                         f"outside the vocabulary of {vocab_size} tokens")


def to_arrow(table: NgramTable, tokens: Sequence[str]) -> pa.Table:
    """Columns token_1..token_n (string), count and rank (int64, 1-based) of a ranked table."""
    ids = unpack(table.keys, table.n, len(tokens))
    dictionary = pa.array(list(tokens), type=pa.string())
    columns = {f"token_{j + 1}": dictionary.take(pa.array(ids[:, j])) for j in range(table.n)}
    columns["count"] = pa.array(table.counts, type=pa.int64())
    columns["rank"] = pa.array(np.arange(1, len(table) + 1, dtype=np.int64))
    return pa.table(columns)


# Zipf fit: the singletons (count == 1) are excluded. In a finite sample they form one long
# plateau of tied counts whose ranks only reflect corpus size and the order of appearance; they are
# most of the distinct n-grams and most of the points in log-rank, so a fit over all ranks is
# dominated by that flat tail (the exponent then moves with corpus size). Counts >= 2 keep the part
# of the curve where frequency is measured, which is what the power law describes.
ZIPF_MIN_COUNT = 2


def zipf_exponent(counts: np.ndarray) -> float | None:
    """alpha in count ~ rank**-alpha: minus the least-squares slope of log(count) on log(rank)
    over the ranks with count >= ZIPF_MIN_COUNT; None with fewer than two such ranks.
    `counts` must be sorted descending (a ranked table)."""
    kept = counts[counts >= ZIPF_MIN_COUNT]
    if len(kept) < 2:
        return None
    log_rank = np.log(np.arange(1, len(kept) + 1, dtype=np.float64))
    slope = np.polyfit(log_rank, np.log(kept.astype(np.float64)), 1)[0]
    return float(-slope)


def plot_zipf(counts: Mapping[str, Mapping[int, np.ndarray]], path: Path | str) -> Path:
    """Log-log frequency vs rank, one panel per level (e.g. word, char), one line per n.
    `counts[level][n]` are ranked counts. A bare Figure draws with Agg: no pyplot global state."""
    fig = Figure(figsize=(5 * len(counts), 4), layout="constrained")
    for ax, (level, by_n) in zip(fig.subplots(1, len(counts), squeeze=False)[0], counts.items()):
        for n, freqs in by_n.items():
            if not len(freqs):
                continue
            # A ranked curve is a staircase; its corners draw the same line from far fewer points.
            change = freqs[1:] != freqs[:-1]
            corners = np.flatnonzero(np.r_[True, change] | np.r_[change, True])
            ax.loglog(corners + 1, freqs[corners], label=f"{n}-gram")
        ax.set(title=f"{level} n-grams", xlabel="rank", ylabel="frequency")
        ax.grid(True, which="major", alpha=0.3)
        if ax.lines:
            ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)
