"""Vectorised n-gram counting over a token-id sequence (D2L 8.3.3), shard by shard, for any
vocabulary and any order.

An n-gram's key is its ids packed as base-`vocab_size` numbers in int64 words, the first word
the most significant: as many ids per word as fit 63 bits (word_spans), so that keys compare as
the id tuples do. Most keys are one word -- every n-gram whose vocabulary_size**n fits 63 bits,
e.g. characters up to n = 7 with 500 symbols, words up to n = 3 with a million -- and longer
ones take more words (two for 4- to 6-grams of a million words). No order or vocabulary is too
large: only the ids must fit an int64.

Counting is integer work with no tuple per n-gram: np.bincount when vocab_size**n is small
(once, for the longest such n: the shorter n-grams' counts are sums of its bins), one np.sort of
the shard's windows per level otherwise, on small shard-local codes (the rank of the window's
(n-1)-gram prefix among the distinct ones, times vocab_size, plus its last id) whatever the key's
width. Those sorted levels split the shard's windows into groups by their first id (contiguous
ranges of ids), whose n-grams are disjoint and, group after group, in key order: the groups are
counted side by side on the cores (numpy's sorts release the GIL) and write their n-grams straight
into the level's table; the number of threads changes nothing in it.

Sharded counting -- what the flow runs as Prefect (or Dask) tasks when `ngrams.shard_tokens` is
set (tasks/ngrams.py); count_ngrams is the map and reduce in one process, with its chunks as the
shards:

    bounds = shard_bounds(len(ids), shard_tokens)            # [(start, stop), ...]
    for start, stop in bounds:                               # map: one task per shard
        tables = count_shard("data/processed/corpus_word.npy", start, stop, max_n, vocab_size)
        save_partial(split_partitions(tables, P), f"shard-{start}.npz")
    for p in range(P):                                       # reduce: one task per partition
        tables = reduce_partials(load_partial(f, p) for f in shard_files)
        save_ranked(tables, f"partition-{p}")
    pieces = merge_ranked([load_ranked(f"partition-{p}", n) for p in range(P)])
    write_parquet(pieces, n, tokens, path)                   # the stage: a k-way merge, streamed

- shard_bounds(length, shard_tokens) -> [(start, stop), ...]: shards of `shard_tokens` window
  start positions covering 0..length-1.
- count_shard(ids, start, stop, max_n, vocab_size) -> {n: NgramTable}: the n-grams, n = 1..max_n,
  that *start* at positions start..stop-1, with first positions in the whole sequence. It reads
  ids[start:stop + max_n - 1]: the n - 1 ids past its end complete the windows that start in it,
  so a window across a shard border is counted once, by the shard it starts in. `ids` is an array
  (of any integer dtype) or the path of a 1-D .npy (read_range: a task reads only its shard, and
  only the path and bounds travel to it). Memory: its tables, 24 bytes per distinct n-gram and
  8 more per key word past the first (words n = 1..5 of a large vocabulary, whose 3- to 5-grams
  are nearly all distinct in a shard: ~110 bytes per token; characters: ~15), plus ~30 bytes per
  token of the shard.
- split_partitions(tables, P): the tables cut into P parts by a hash of the n-gram, so that
  every shard sends a given n-gram to the same reduce task.
- reduce_partials(partials) -> {n: NgramTable}: merges partials as they arrive, in any order
  (counts add up, the earliest first position wins). Memory: of the order of the distinct
  n-grams it receives (a partition's: about 1/P of all of them), not of the corpus.
- merge_ranked(parts): the ranked partitions as one ranked sequence, a block of each at a time
  (read from the files: memory is P blocks, not the distinct n-grams).
- save_partial / load_partial, save_ranked / load_ranked: those hand-overs as files, which is how
  tasks on Dask workers pass them on (the working tree is shared; the flow passes paths).

Whatever the shard size, the number of partitions and the order of the partials, the tables are
the same -- keys, counts, first positions, hence ranks -- and write_parquet writes byte-identical
files.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.lib.format as npy_format
import pyarrow as pa
import pyarrow.parquet as pq

from seqlm.figures import save_png
from seqlm.io import atomic_path
from seqlm.threads import cores

if TYPE_CHECKING:        # matplotlib: imported by the plot only (the checks use this module)
    from matplotlib.figure import Figure

MAX_KEY = 2**63 - 1
GROUP_WINDOWS = 1 << 20      # windows per group of a shard's sorted levels (count_shard)
# The last level is counted densely (a bin per possible n-gram) up to this many bins per
# window: bincount over the bins, 16 bytes each, beats sorting the windows (the 5-grams of
# characters: 28**5 = 17M bins for a chunk of 10M windows). Earlier levels stay at one bin per
# window: the sorted level after them takes their keys as codes (count_shard).
LAST_LEVEL_BINS_PER_WINDOW = 4
# A shard's positions are int32 (half the memory of the sorted levels' working arrays): larger
# shards are counted in parts.
MAX_SHARD_WINDOWS = 2**31


class NgramError(ValueError):
    """The ids or the order cannot be counted (an id outside the vocabulary, a bad shard)."""


@cache
def ids_per_word(vocab_size: int) -> int:
    """How many ids one int64 key word holds: the most whose base-`vocab_size` number fits 63
    bits (all of them for a vocabulary of one token: its only key is 0)."""
    if not 1 <= vocab_size <= MAX_KEY + 1:
        raise NgramError(f"vocabulary size must be between 1 and 2**63 (ids are int64), "
                         f"got {vocab_size}")
    if vocab_size == 1:
        return 64
    ids = 1
    while vocab_size ** (ids + 1) - 1 <= MAX_KEY:
        ids += 1
    return ids


def word_spans(vocab_size: int, n: int) -> list[tuple[int, int]]:
    """The [start, stop) ids of an n-gram that each word of its key packs, first word first."""
    per_word = ids_per_word(vocab_size)
    return [(a, min(a + per_word, n)) for a in range(0, max(n, 1), per_word)]


def pack(windows: Sequence[np.ndarray], base: int) -> np.ndarray:
    """Keys, shape (words, len(windows[0])), of aligned id columns: windows[0] is the first
    token of the n-grams."""
    count = len(windows[0]) if windows else 0
    spans = word_spans(base, len(windows))
    keys = np.zeros((len(spans), count), dtype=np.int64)
    for word, (a, b) in zip(keys, spans):
        for column in windows[a:b]:
            word *= base
            word += column
    return keys


def unpack(keys: np.ndarray, n: int, base: int) -> np.ndarray:
    """(number of keys, n) array of the ids packed in `keys` (shape (words, number of keys))."""
    ids = np.empty((keys.shape[-1], n), dtype=np.int64)
    if not len(ids):
        return ids
    for word, (a, b) in zip(keys, word_spans(base, n)):
        rest = word.astype(np.int64, copy=True)
        for j in range(b - 1, a - 1, -1):
            rest, ids[:, j] = np.divmod(rest, base)
    return ids


def group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Index of the first element of each run of equal keys in sorted keys: values (1-D), or
    words (2-D, one row per word)."""
    words = np.atleast_2d(sorted_keys)
    is_start = np.zeros(words.shape[1], dtype=bool)
    is_start[:1] = True
    for word in words:
        is_start[1:] |= word[1:] != word[:-1]
    return np.flatnonzero(is_start)


def key_order(keys: np.ndarray) -> np.ndarray:
    """Indices that sort keys (shape (words, m)) as the id tuples they pack, stably.

    One stable argsort of the first word: timsort, which merges the sorted runs of concatenated
    tables in linear time. Only the keys tied on the first word are sorted further, by the rank
    of their tie (which orders them already) and the next word in one int64, or that word's high
    bits where both do not fit 63 bits together (its low bits are sorted on next): n-grams
    rarely share their first few ids, so the later words cost little."""
    order = np.argsort(keys[0], kind="stable")
    if len(keys) == 1 or len(order) < 2:
        return order
    first = keys[0][order]
    same_as_next = first[1:] == first[:-1]
    tied = np.flatnonzero(np.r_[same_as_next, False] | np.r_[False, same_as_next])
    if not len(tied):
        return order
    new_tie = np.r_[True, ~same_as_next[tied[1:] - 1]]     # tied[i] starts a run of ties
    tie = np.cumsum(new_tie, dtype=np.int64) - 1
    rest = np.take(keys[1:], order[tied], axis=1)
    word, later = rest[0], rest[1:]
    word_bits = int(word.max()).bit_length()
    high_bits = min(63 - int(tie[-1]).bit_length(), word_bits)
    low_bits = word_bits - high_bits
    head = (tie << high_bits) | (word >> low_bits)
    if low_bits:
        later = np.vstack([word & ((1 << low_bits) - 1), later])
    order[tied] = order[tied][key_order(np.vstack([head, later]))]
    return order


@dataclass(frozen=True)
class NgramTable:
    """Distinct n-grams as packed keys with their counts and first positions in the corpus."""
    n: int
    keys: np.ndarray     # int64, shape (words, number of n-grams): see word_spans
    counts: np.ndarray   # int64
    first: np.ndarray    # int64, start position of the first occurrence

    @classmethod
    def empty(cls, n: int, words: int = 1) -> "NgramTable":
        return cls(n, np.empty((words, 0), dtype=np.int64),
                   *(np.empty(0, dtype=np.int64) for _ in range(2)))

    def __len__(self) -> int:
        return len(self.counts)

    def rows(self, start: int, stop: int) -> "NgramTable":
        """Entries start..stop-1, in memory."""
        return NgramTable(self.n, np.asarray(self.keys[:, start:stop]),
                          *(np.asarray(column[start:stop]) for column in (self.counts, self.first)))

    def take(self, index: np.ndarray) -> "NgramTable":
        # np.take along the keys' rows keeps each word contiguous (fancy indexing would not)
        return NgramTable(self.n, np.take(self.keys, index, axis=1), self.counts[index],
                          self.first[index])

    @classmethod
    def concat(cls, n: int, tables: Sequence["NgramTable"]) -> "NgramTable":
        tables = [t for t in tables if len(t)] or list(tables[:1])
        if len(tables) <= 1:
            return tables[0] if tables else cls.empty(n)
        return cls(n, np.concatenate([t.keys for t in tables], axis=1),
                   *(np.concatenate([getattr(t, name) for t in tables])
                     for name in ("counts", "first")))

    def ranked(self) -> "NgramTable":
        """Sorted by count descending, ties by first appearance: what the seed's Counter plus
        stable sort gives."""
        return self.take(rank_order(self.counts, self.first))


def rank_order(counts: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Indices that sort by count descending, then first position ascending.

    When (count, first, index) fit the 63 bits of one int64 (always for corpora of up to 2**21
    tokens, and far beyond in practice: counts and distinct n-grams are much fewer than tokens)
    they are packed and np.sort-ed, much faster than lexsort, which is the fallback.
    """
    if not len(counts):
        return np.empty(0, dtype=np.int64)
    top = int(counts.max())
    first_bits, index_bits = int(first.max()).bit_length(), (len(counts) - 1).bit_length()
    if top.bit_length() + first_bits + index_bits > 63:
        return np.lexsort((first, -counts))
    packed = ((top - counts) << (first_bits + index_bits)) | (first << index_bits)
    return np.sort(packed | np.arange(len(counts), dtype=np.int64)) & ((1 << index_bits) - 1)


def shard_bounds(length: int, shard_tokens: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of `shard_tokens` window start positions covering 0..length-1; one
    empty shard for an empty sequence, so that its count still has a (empty) table for every n."""
    if shard_tokens < 1:
        raise NgramError(f"shard size must be >= 1 token, got {shard_tokens}")
    return [(start, min(start + shard_tokens, length))
            for start in range(0, max(length, 1), shard_tokens)]


def count_shard(ids: np.ndarray | Path | str, start: int, stop: int, max_n: int,
                vocab_size: int, threads: int | None = None) -> dict[int, NgramTable]:
    """{n: NgramTable} (sorted by key) of the n-grams, n = 1..max_n, that start at positions
    start..stop-1 of `ids` (an array, or the path of a 1-D .npy); it reads
    ids[start:stop + max_n - 1]. The sorted levels run on `threads` threads (None: the cores this
    process may use); the tables do not depend on it. See the module docstring."""
    if max_n < 1 or not 0 <= start <= stop:
        raise NgramError(f"max_n={max_n} must be >= 1 and 0 <= start={start} <= stop={stop}")
    ids_per_word(vocab_size)                 # a vocabulary int64 ids can number
    total = len(ids) if isinstance(ids, np.ndarray) else NpyHeader.read(ids).shape[-1]
    stop = min(stop, total)
    step = _max_chunk(vocab_size)
    if stop - start > step:                  # shard-local codes would overflow: count in parts
        return reduce_partials(count_shard(ids, a, min(a + step, stop), max_n, vocab_size,
                                           threads)
                               for a in range(start, stop, step))
    end = min(stop + max_n - 1, total)
    chunk = np.asarray(ids[start:end]) if isinstance(ids, np.ndarray) else \
        read_range(ids, start, end)
    _check_ids(chunk, vocab_size, start)
    # A copy in memory, in the smallest dtype that holds the ids: the sorted levels read it at
    # random positions, and fewer bytes per id miss the cache less (the codes are int64).
    chunk = chunk.astype(np.uint16 if vocab_size <= 1 << 16 else
                         np.int32 if vocab_size <= 1 << 31 else np.int64)
    windows = [max(min(stop, total - n + 1) - start, 0) for n in range(1, max_n + 1)]

    # Each window gets a small shard-local code that sorts as its key does: the code of its
    # (n-1)-gram prefix times vocab_size plus its last id. While vocab_size**n is small (at
    # most a bin per window; LAST_LEVEL_BINS_PER_WINDOW for the last level) the code is the
    # packed key itself and the level is counted densely, windows in position order. The first
    # level past that sorts; so does every later one, with the prefix's rank among the distinct
    # (n-1)-grams as prefix code, which keeps codes below (shard size) * vocab_size for any n.
    tables: dict[int, NgramTable] = {}
    codes = np.zeros(windows[0], dtype=np.int64)            # the empty prefix of unigrams
    n = 1
    while n <= max_n and 0 < vocab_size**n <= (LAST_LEVEL_BINS_PER_WINDOW if n == max_n else 1) \
            * windows[n - 1]:
        codes = codes[:windows[n - 1]]                      # in place: a level's codes are
        codes *= vocab_size                                 # only read by the next one
        codes += chunk[n - 1:n - 1 + windows[n - 1]]
        n += 1
    if n > 1:
        tables.update(_dense_levels(codes, chunk, windows, n - 1, vocab_size, start))
    if n <= max_n and windows[n - 1]:
        # The sorted levels, in groups of windows by their first id (contiguous id ranges):
        # every n-gram of a group starts with one of its ids, so the groups' n-grams are
        # disjoint and, in group order, sorted by key. The groups go through the levels
        # together, on `threads` threads (numpy's sorts and array loops release the GIL): each
        # sorts its windows and counts its distinct n-grams, then writes them at its offset
        # into the level's table, so that no table is copied or concatenated.
        groups = [_Group(chunk, pos, codes, vocab_size, vocab_size**(n - 1), start) for pos in
                  _first_id_groups(chunk[:windows[n - 1]], tables.get(1), vocab_size)]
        del codes                            # the groups' now, until their first sort
        workers = min(len(groups), threads or cores())
        with contextlib.ExitStack() as stack:
            run = stack.enter_context(ThreadPoolExecutor(workers)).map if workers > 1 else map
            for level in range(n, max_n + 1):
                distinct = list(run(_Group.sort, groups, repeat(level),
                                    repeat(windows[level - 1])))
                offsets = np.cumsum([0, *distinct])
                columns = (np.empty((len(word_spans(vocab_size, level)), offsets[-1]),
                                    dtype=np.int64),
                           *(np.empty(offsets[-1], dtype=np.int64) for _ in range(2)))
                list(run(_Group.emit, groups, repeat(columns), offsets[:-1].tolist(),
                         repeat(level < max_n)))
                tables[level] = NgramTable(level, *columns)
    for n in range(1, max_n + 1):
        tables.setdefault(n, NgramTable.empty(n, len(word_spans(vocab_size, n))))
    return tables


def reduce_partials(partials: Iterable[Mapping[int, NgramTable]]) -> dict[int, NgramTable]:
    """The tables of all shards' partial counts (count_shard results), merged as they come.

    Per n, partials wait in a batch until it holds four times as many entries as the running
    table, then batch and table merge in one go (a stable argsort, which merges sorted runs).
    Each n-gram goes through ~1.5 merges on average (merging every partial into the running table
    would cost shards x distinct n-grams), and memory stays within five times the distinct
    n-grams plus a partial -- about the distinct n-grams themselves for long n-grams of text,
    which mostly occur once.
    """
    merged: dict[int, NgramTable] = {}
    batches: dict[int, list[NgramTable]] = {}
    for partial in partials:
        for n, table in partial.items():
            batch = batches.setdefault(n, [])
            batch.append(table)
            if n not in merged or sum(map(len, batch)) >= 4 * len(merged[n]):
                if n in merged:
                    batch.insert(0, merged.pop(n))
                merged[n] = merge_tables(batch)          # empties the batch
    for n, batch in batches.items():
        if batch:
            batch.insert(0, merged.pop(n))
            merged[n] = merge_tables(batch)
    return dict(sorted(merged.items()))


def merge_tables(tables: list[NgramTable]) -> NgramTable:
    """Tables of the same n (each sorted by key) in one: an n-gram's counts add up and its first
    position is the earliest. A stable argsort is timsort, which merges the sorted runs
    (key_order).

    Empties `tables`, so that the inputs are freed once copied, before the sort: the memory
    peak is ~55 bytes per input entry, 16 more per key word past the first."""
    nonempty = [t for t in tables if len(t)] or tables[:1]
    tables.clear()
    if len(nonempty) == 1:
        return nonempty[0]
    merged = NgramTable.concat(nonempty[0].n, nonempty)
    nonempty.clear()
    n, keys, counts, first = merged.n, merged.keys, merged.counts, merged.first
    del merged
    order = key_order(keys)
    keys = np.take(keys, order, axis=1)
    starts = group_starts(keys)
    counts = np.add.reduceat(counts[order], starts)
    first = np.minimum.reduceat(first[order], starts)
    return NgramTable(n, np.take(keys, starts, axis=1), counts, first)


def split_partitions(tables: dict[int, NgramTable], partitions: int
                     ) -> list[dict[int, NgramTable]]:
    """`tables` cut into `partitions` parts by a hash of the packed key (each part still sorted
    by key): a given n-gram goes to the same part from every shard, and the frequent leading
    words of a language spread over all parts instead of filling the first.

    Empties `tables` as it goes, so that memory holds the parts and one table, not the tables
    twice."""
    if not 1 <= partitions <= 1 << 16:
        raise NgramError(f"partitions must be between 1 and 65536, got {partitions}")
    parts: list[dict[int, NgramTable]] = [{} for _ in range(partitions)]
    golden = np.uint64(0x9E3779B97F4A7C15)
    for n in sorted(tables):
        table = tables.pop(n)
        # Fibonacci hashing: the high bits of key * 2**64/phi (mod 2**64) are well mixed; a
        # key of several words folds each next word in before multiplying again.
        mixed = table.keys[0].astype(np.uint64) * golden
        for word in table.keys[1:]:
            mixed ^= word.astype(np.uint64)
            mixed *= golden
        part = ((mixed >> np.uint64(33)) % np.uint64(partitions)).astype(np.uint16)
        del mixed
        order = np.argsort(part, kind="stable")     # a radix sort (16-bit): by part, key order
        ends = np.cumsum(np.bincount(part, minlength=partitions)).tolist()
        table = table.take(order)                   # one gather; the parts are slices of it
        for p, (start, stop) in enumerate(zip([0, *ends[:-1]], ends)):
            parts[p][n] = table.rows(start, stop)
    return parts


def save_partial(partitions: Sequence[Mapping[int, NgramTable]], path: Path | str) -> Path:
    """A shard's partial counts, cut in partitions (split_partitions), as one .npz archive
    written whole or not at all: what a shard task hands to the reduce tasks through the shared
    working tree. A reduce task reads its partition only.

    Counts and first positions (from the shard's first one) are stored in the smallest unsigned
    type that holds them (32 bits for any shard under 4G tokens): a third less disk and I/O than
    int64 for one-word keys, and the partials of a large corpus are tens of GB."""
    tables = [table for parts in partitions for table in parts.values() if len(table)]
    offset = min((int(table.first.min()) for table in tables), default=0)
    first_type = np.min_scalar_type(max((int(t.first.max()) - offset for t in tables), default=0))
    count_type = np.min_scalar_type(max((int(t.counts.max()) for t in tables), default=0))
    arrays = {"first_offset": np.array(offset, dtype=np.int64)}
    for p, parts in enumerate(partitions):
        for n, table in parts.items():
            arrays[f"keys_{n}_{p}"] = table.keys
            arrays[f"counts_{n}_{p}"] = table.counts.astype(count_type)
            arrays[f"first_{n}_{p}"] = (table.first - offset).astype(first_type)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    return Path(path)


def partial_orders(path: Path | str) -> list[int]:
    """The orders n of the tables in what save_partial wrote."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return _orders(archive.files)
    except (OSError, ValueError, IndexError) as exc:
        raise NgramError(f"{path}: unreadable partial n-gram counts ({exc})") from None


def _orders(names: Iterable[str]) -> list[int]:
    return sorted({int(name.split("_")[1]) for name in names if name.startswith("keys_")})


def load_partial(path: Path | str, partition: int = 0, n: int | None = None
                 ) -> dict[int, NgramTable]:
    """Partition `partition` of what save_partial wrote (of order `n` only, or all of them);
    NgramError naming the file when it is not such a file or lacks that partition. An .npz is
    read an array at a time: only what is asked for is read."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            offset = int(archive["first_offset"])
            tables = {n: NgramTable(n, archive[f"keys_{n}_{partition}"],
                                    archive[f"counts_{n}_{partition}"].astype(np.int64),
                                    archive[f"first_{n}_{partition}"].astype(np.int64) + offset)
                      for n in ([n] if n is not None else _orders(archive.files))}
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise NgramError(f"{path}: unreadable partial n-gram counts ({exc})") from None
    if any(table.keys.ndim != 2 for table in tables.values()):
        raise NgramError(f"{path}: unreadable partial n-gram counts (keys are not 2-D)")
    return tables


def save_ranked(tables: Mapping[int, NgramTable], folder: Path | str) -> Path:
    """Ranked tables as `folder`/<n>.npy (rows: the key words, counts, first), which
    load_ranked reads a block at a time; each file is written whole or not at all."""
    for n, table in tables.items():
        with atomic_path(Path(folder) / f"{n}.npy") as tmp, open(tmp, "wb") as handle:
            np.save(handle, np.vstack([table.keys, table.counts, table.first]))
    return Path(folder)


@dataclass(frozen=True)
class NpyHeader:
    """What the header of a .npy file says: where the data starts, its shape and dtype."""
    path: Path
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def read(cls, path: Path | str) -> "NpyHeader":
        """NgramError naming the file when it is not a C-order .npy array."""
        try:
            with open(path, "rb") as handle:
                version = npy_format.read_magic(handle)
                shape, fortran, dtype = (npy_format.read_array_header_1_0(handle)
                                         if version == (1, 0) else
                                         npy_format.read_array_header_2_0(handle))
                offset = handle.tell()
        except (OSError, ValueError) as exc:
            raise NgramError(f"{path}: not a readable .npy array ({exc})") from None
        if fortran or dtype.hasobject:
            raise NgramError(f"{path}: expected a C-order numeric .npy array")
        return cls(Path(path), offset, shape, dtype)


def read_range(path: Path | str | NpyHeader, start: int, stop: int, row: int = 0) -> np.ndarray:
    """Elements start..stop-1 of a 1-D .npy (of row `row` of a 2-D one), read from the file.
    Not a memory map: the pages of a map stay in the process's resident memory once read, so
    a process that reads a whole corpus shard by shard would end up holding all of it."""
    header = path if isinstance(path, NpyHeader) else NpyHeader.read(path)
    length = header.shape[-1] if header.shape else 1
    stop = max(min(stop, length), 0)
    start = min(max(start, 0), stop)
    with open(header.path, "rb") as handle:
        handle.seek(header.offset + (row * length + start) * header.dtype.itemsize)
        data = np.fromfile(handle, dtype=header.dtype, count=stop - start)
    if len(data) != stop - start:
        raise NgramError(f"{header.path}: truncated .npy array ({len(data)} of {stop - start} "
                         f"elements from position {start})")
    return data


@dataclass(frozen=True)
class RankedFile:
    """A ranked table that save_ranked wrote, read a block at a time (merge_ranked)."""
    n: int
    header: NpyHeader

    def __len__(self) -> int:
        return self.header.shape[1]

    def rows(self, start: int, stop: int) -> NgramTable:
        words = self.header.shape[0] - 2
        keys = np.vstack([read_range(self.header, start, stop, row) for row in range(words)])
        return NgramTable(self.n, keys, *(read_range(self.header, start, stop, row)
                                          for row in (words, words + 1)))


def load_ranked(folder: Path | str, n: int) -> RankedFile:
    """The n-gram table save_ranked wrote; NgramError naming the file."""
    path = Path(folder) / f"{n}.npy"
    header = NpyHeader.read(path)
    if len(header.shape) != 2 or header.shape[0] < 3 or header.dtype != np.int64:
        raise NgramError(f"{path}: unreadable ranked n-gram counts (shape {header.shape} "
                         f"{header.dtype}, expected (words + 2, m) int64)")
    return RankedFile(n, header)


def merge_ranked(parts: Sequence[NgramTable | RankedFile], block: int = 1 << 18
                 ) -> Iterator[NgramTable]:
    """Ranked tables of disjoint n-grams (the partitions) as one ranked sequence, in pieces: a
    k-way merge that reads `block` entries of each part at a time, so that memory is a few
    blocks per part whatever the number of distinct n-grams.

    Each round, the smallest of the blocks' last entries (in rank order) bounds what can be
    emitted: no entry beyond a block ranks before its last one, so every entry up to that bound
    is final. The part that sets the bound gives its whole block, so each round progresses.
    Distinct n-grams start at distinct positions: (count, first) orders them totally."""
    n = parts[0].n if parts else 1
    cursor = [0] * len(parts)
    emitted = False
    while True:
        live = [i for i, part in enumerate(parts) if cursor[i] < len(part)]
        if not live:
            if not emitted:                  # what an empty table writes needs its n
                yield parts[0].rows(0, 0) if parts else NgramTable.empty(n)
            return
        blocks = {i: parts[i].rows(cursor[i], cursor[i] + block) for i in live}
        limits = [(int(b.counts[-1]), int(b.first[-1])) for i, b in blocks.items()
                  if cursor[i] + len(b) < len(parts[i])]
        bound_count, bound_first = min(limits, key=lambda cf: (-cf[0], cf[1])) if limits \
            else (0, MAX_KEY)
        pieces = []
        for i, b in blocks.items():
            taken = int(np.count_nonzero((b.counts > bound_count)
                                         | ((b.counts == bound_count) & (b.first <= bound_first))))
            pieces.append(b.rows(0, taken))
            cursor[i] += taken
        emitted = True
        yield NgramTable.concat(n, pieces).ranked()


def count_ngrams(ids: np.ndarray, max_n: int, vocab_size: int,
                 chunk_tokens: int = 16_000_000, threads: int | None = None
                 ) -> dict[int, NgramTable]:
    """n-gram tables for n = 1..max_n over `ids` (1-D, any integer dtype, may be a memory map),
    sorted by key (`.ranked()` gives the frequency order): the shards of `chunk_tokens` counted
    one after the other (each on `threads` threads, count_shard) and reduced, so memory is one
    shard's plus the distinct n-grams."""
    if max_n < 1 or chunk_tokens < 1:
        raise NgramError(f"max_n={max_n} and chunk_tokens={chunk_tokens} must be >= 1")
    return reduce_partials(count_shard(ids, start, stop, max_n, vocab_size, threads)
                           for start, stop in shard_bounds(len(ids), chunk_tokens))


def _max_chunk(base: int) -> int:
    """Largest shard whose codes (a prefix code below the shard's windows, times `base`, plus
    an id) fit an int64, and whose positions fit an int32."""
    return min(max((MAX_KEY + 1) // base, 1), MAX_SHARD_WINDOWS)


def _dense_levels(keys: np.ndarray, chunk: np.ndarray, windows: Sequence[int], top: int,
                  base: int, start: int) -> dict[int, NgramTable]:
    """The tables of levels 1..top from the packed keys of the top level's windows (in position
    order): a bin per possible n-gram, counted once, by array indexing (linear where a sort is
    n log n). A level below is its upper level's bins summed (counts) and minimised (first
    positions) over their last id, plus its windows too near the sequence's end to extend."""
    counts = np.bincount(keys, minlength=base**top)
    # Positions in the shard fit an int32 (_max_chunk): half the fresh memory of int64, whose
    # page faults were most of a first count's time.
    first = np.full(base**top, len(keys), dtype=np.int32)     # absent: past every window
    np.minimum.at(first, keys, np.arange(len(keys), dtype=np.int32))
    tables = {}
    for n in range(top, 0, -1):
        if n < top:
            counts = counts.reshape(-1, base).sum(axis=1)
            first = first.reshape(-1, base).min(axis=1)
            for position in range(windows[n], windows[n - 1]):    # at most top - n of them
                key = int(pack([chunk[position + j:position + j + 1] for j in range(n)],
                               base)[0, 0])
                counts[key] += 1
                first[key] = min(first[key], position)
        present = np.flatnonzero(counts)
        tables[n] = NgramTable(n, present[None, :], counts[present],
                               first[present] + np.int64(start))
    return tables


def _first_id_groups(first_ids: np.ndarray, unigrams: NgramTable | None, vocab_size: int
                     ) -> list[np.ndarray]:
    """The positions 0..len(first_ids)-1 of a shard's windows (int32), cut by their first id
    into ranges of ids of about GROUP_WINDOWS windows each (one frequent id can make its group
    larger), each group's positions ascending. One group when the unigrams are still to be
    counted: they are the first level sorted, the ids' frequencies unknown."""
    count = len(first_ids)
    parts = min(-(-count // GROUP_WINDOWS), 256)              # group numbers fit a uint8
    if parts <= 1 or unigrams is None:
        return [np.arange(count, dtype=np.int32)]
    running = np.cumsum(unigrams.counts)
    crossing = np.searchsorted(running, np.arange(1, parts) * (running[-1] / parts))
    edges = np.unique(unigrams.keys[0][crossing] + 1)         # the first id of each later group
    group = np.searchsorted(edges, np.arange(vocab_size), side="right").astype(np.uint8)
    group = group[first_ids]
    order = np.argsort(group, kind="stable")    # a radix sort: by group, positions ascending
    ends = np.cumsum(np.bincount(group, minlength=len(edges) + 1))
    return [order[a:b].astype(np.int32) for a, b in zip(np.r_[0, ends[:-1]], ends) if b > a]


class _Group:
    """A group of a shard's windows through its sorted levels (count_shard): their positions in
    the shard and their codes, in the order of the last level's sort.

    np.sort of plain int64 runs several times faster than argsort, so a window's index in the
    group goes into the low bits of its code: one sort gives the distinct n-grams, and the
    indices the new order of the windows' positions (the first of each n-gram's windows is its
    first position: equal codes keep their previous order, which is by position). The windows
    stay in their sorted order from one level to the next (no scatter back), so a level's codes
    come sorted by prefix and only the windows of a same prefix are out of order: timsort
    (kind="stable"), which merges the runs it finds, orders those several times faster than the
    default sort. Where code and index do not fit 63 bits together (a vocabulary of millions and
    a group of millions of windows), a stable argsort of the codes orders them the same way.
    """

    def __init__(self, chunk: np.ndarray, pos: np.ndarray, prefixes: np.ndarray, base: int,
                 prefix_codes: int, offset: int) -> None:
        self.chunk, self.base, self.offset = chunk, base, offset
        self.pos = pos                                 # int32, ascending until the first sort
        self.prefixes: np.ndarray | None = prefixes    # packed prefix keys, by shard position
        self.prefix_codes = prefix_codes               # prefix codes are below this
        self.codes = np.empty(0, dtype=np.int64)       # local codes, then the windows' ranks
        self.prefix_keys: np.ndarray | None = None     # rank -> key of the last level's n-grams
        self.is_start: np.ndarray | None = None        # the last sort's first of each n-gram
        self.starts: np.ndarray | None = None

    def sort(self, n: int, windows: int) -> int:
        """Sorts the windows of n ids (those at shard positions < `windows`) by n-gram; returns
        the number of distinct n-grams."""
        if self.prefixes is not None:                  # the first level: gather our prefixes
            self.codes, self.prefixes = self.prefixes[self.pos], None
        if len(self.pos) and self.pos.max() >= windows:    # the sequence's last window is short
            keep = self.pos < windows
            self.pos, self.codes = self.pos[keep], self.codes[keep]
        local = self.codes                             # updated in place
        self.is_start = self.starts = None
        if not len(local):
            return 0
        local *= self.base                             # prefix code * base + last id
        local += np.take(self.chunk[n - 1:], self.pos)     # take: faster than indexing with pos
        index_bits = (len(local) - 1).bit_length()
        if (self.prefix_codes * self.base - 1).bit_length() + index_bits <= 63:
            local <<= index_bits
            local |= np.arange(len(local), dtype=np.int64)
            local.sort(kind=None if self.prefix_keys is None else "stable")
            index = np.bitwise_and(local, (1 << index_bits) - 1)
            local >>= index_bits
        else:
            index = np.argsort(local, kind="stable")
            self.codes = local = local[index]
        self.pos = np.take(self.pos, index)
        self.is_start = np.empty(len(local), dtype=bool)
        self.is_start[0] = True
        np.not_equal(local[1:], local[:-1], out=self.is_start[1:])
        self.starts = np.flatnonzero(self.is_start)
        return len(self.starts)

    def emit(self, columns: tuple[np.ndarray, np.ndarray, np.ndarray], at: int, more: bool
             ) -> None:
        """Writes the distinct n-grams of the last sort into the level's table columns (key
        words, counts, first positions) from row `at`; with `more`, the windows' ranks among
        them become the prefix codes of the next level."""
        starts, local = self.starts, self.codes
        if starts is None:                             # no windows
            return
        keys, counts, first = (column[..., at:at + len(starts)] for column in columns)
        code = keys[-1]
        np.take(local, starts, out=code)               # prefix code * base + last id
        # The key: the prefix's key words (its rank's, or the dense prefix key itself), the
        # last id appended to their last word, or as a word of its own where that one is full.
        # `counts` and `local` (read) serve as scratch: no temporary arrays.
        prefix_words = 1 if self.prefix_keys is None else len(self.prefix_keys)
        if self.prefix_keys is not None or len(keys) > prefix_words:
            prefix = np.floor_divide(code, self.base, out=counts)
            scratch = local[:len(starts)]
            if self.prefix_keys is None:               # [dense prefix key, last id]
                keys[0] = prefix
            else:
                for word, prefix_word in zip(keys, self.prefix_keys[:len(keys) - 1]):
                    np.take(prefix_word, prefix, out=word)
            if len(keys) > prefix_words:               # the last id alone: code - prefix * base
                code -= np.multiply(prefix, self.base, out=scratch)
            else:                                      # last word * base + last id
                lifted = np.take(self.prefix_keys[-1], prefix, out=scratch)
                lifted -= prefix
                lifted *= self.base
                code += lifted
        np.subtract(starts[1:], starts[:-1], out=counts[:-1])
        counts[-1] = len(local) - starts[-1]
        np.add(np.take(self.pos, starts), np.int64(self.offset), out=first)
        if more:
            np.cumsum(self.is_start, dtype=np.int64, out=local)
            local -= 1
            self.prefix_keys, self.prefix_codes = keys, len(starts)
        self.starts = self.is_start = None


def _check_ids(chunk: np.ndarray, vocab_size: int, offset: int) -> None:
    if chunk.dtype.kind not in "iu":
        raise NgramError(f"token ids must be integers, got dtype {chunk.dtype}")
    if len(chunk) and (chunk.min() < 0 or chunk.max() >= vocab_size):
        bad = np.flatnonzero((chunk < 0) | (chunk >= vocab_size))
        raise NgramError(f"token id {int(chunk[bad[0]])} at position {offset + int(bad[0])} is "
                         f"outside the vocabulary of {vocab_size} tokens")



PARQUET_ROWS = 1 << 20     # pyarrow's default row group: the rows converted and written at a time


def to_arrow(table: NgramTable, tokens: Sequence[str] | pa.Array, first_rank: int = 1
             ) -> pa.Table:
    """Columns token_1..token_n (string), count and rank (int64, from `first_rank`) of a ranked
    table. `tokens`: the vocabulary, id -> token (any Unicode), or it as an arrow string array."""
    ids = unpack(table.keys, table.n, len(tokens))
    dictionary = tokens if isinstance(tokens, pa.Array) else \
        pa.array(list(tokens), type=pa.string())
    columns = {f"token_{j + 1}": dictionary.take(pa.array(ids[:, j])) for j in range(table.n)}
    columns["count"] = pa.array(table.counts, type=pa.int64())
    columns["rank"] = pa.array(np.arange(first_rank, first_rank + len(table), dtype=np.int64))
    return pa.table(columns)


def write_parquet(pieces: NgramTable | Iterable[NgramTable], tokens: Sequence[str] | pa.Array,
                  path: Path | str, rows: int = PARQUET_ROWS) -> int:
    """A ranked table, whole or as consecutive pieces of one (merge_ranked), as zstd Parquet:
    `rows` rows (one row group) converted and written at a time, so memory is a row group's and
    the bytes are those of pq.write_table of the whole table however it is cut. Returns the
    number of rows."""
    written = 0
    dictionary = tokens if isinstance(tokens, pa.Array) else \
        pa.array(list(tokens), type=pa.string())           # once, not per row group
    try:
        with contextlib.ExitStack() as stack:
            writer = None
            for group in _row_groups([pieces] if isinstance(pieces, NgramTable) else pieces,
                                     rows):
                if writer is None:
                    writer = stack.enter_context(pq.ParquetWriter(path, _schema(group.n),
                                                                  compression="zstd"))
                writer.write_table(to_arrow(group, dictionary, written + 1), row_group_size=rows)
                written += len(group)
    except OSError as exc:
        if exc.filename is not None:
            raise
        # pyarrow's I/O errors (a full disk) name no file; the stage's error names the table
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    return written


def _row_groups(pieces: Iterable[NgramTable], rows: int) -> Iterator[NgramTable]:
    """Consecutive pieces regrouped into `rows` entries each, the last one shorter (an empty
    one when there is nothing: a Parquet file still has its schema and one empty group)."""
    pending: list[NgramTable] = []
    held, emitted = 0, False
    for piece in pieces:
        pending.append(piece)
        held += len(piece)
        if held >= rows:
            whole = NgramTable.concat(piece.n, pending)
            start = 0
            for start in range(0, len(whole) - rows + 1, rows):
                yield whole.rows(start, start + rows)
            start += rows
            emitted = True
            pending, held = [whole.rows(start, len(whole))], len(whole) - start
    if pending and (held or not emitted):
        yield NgramTable.concat(pending[0].n, pending)


def _schema(n: int) -> pa.Schema:
    return pa.schema([*((f"token_{j + 1}", pa.string()) for j in range(n)),
                      ("count", pa.int64()), ("rank", pa.int64())])


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
    log_count = np.log(kept, dtype=np.float64)
    log_rank = np.arange(1, len(kept) + 1, dtype=np.float64)
    del kept                             # tens of millions of points on a large corpus
    np.log(log_rank, out=log_rank)
    slope = np.polyfit(log_rank, log_count, 1)[0]
    return float(-slope)


class CountRuns:
    """The counts of a ranked table, in rank order, as runs of equal counts, gathered piece by
    piece as the table is written: what the Zipf fit and plot need, in kilobytes. Counts fall as
    the rank grows, so runs are few (the last one, the singletons, holds most n-grams of a large
    corpus) where the counts themselves are hundreds of millions."""

    def __init__(self) -> None:
        self._values: list[np.ndarray] = []
        self._lengths: list[np.ndarray] = []

    def add(self, counts: np.ndarray) -> None:
        """The counts of the table's next rows."""
        starts = group_starts(counts)
        self._values.append(counts[starts])
        self._lengths.append(np.diff(np.r_[starts, len(counts)]))

    def runs(self) -> tuple[np.ndarray, np.ndarray]:
        """(count, number of rows) of each run, in rank order."""
        values = np.concatenate([np.empty(0, np.int64), *self._values])
        lengths = np.concatenate([np.empty(0, np.int64), *self._lengths])
        starts = group_starts(values)                  # a run the pieces cut, joined again
        return values[starts], np.add.reduceat(lengths, starts) if len(starts) else lengths

    def counts(self, minimum: int = 1) -> np.ndarray:
        """The ranked counts that are >= minimum."""
        values, lengths = self.runs()
        kept = values >= minimum
        return np.repeat(values[kept], lengths[kept])

    def corners(self) -> tuple[np.ndarray, np.ndarray]:
        """(rank - 1, count) of the first and the last row of each run, in rank order: the
        corners of the ranked curve, a staircase, which draw the same line as all its points."""
        values, lengths = self.runs()
        ends = np.cumsum(lengths)
        index = np.column_stack([ends - lengths, ends - 1]).ravel()
        kept = np.column_stack([np.ones(len(values), dtype=bool), lengths > 1]).ravel()
        return index[kept], np.repeat(values, 2)[kept]


def plot_zipf(counts: Mapping[str, Mapping[int, CountRuns]], path: Path | str) -> Path:
    """Log-log frequency vs rank, one panel per level (e.g. word, char), one line per n.
    `counts[level][n]` are a ranked table's counts."""
    return save_png(path, lambda: _zipf_figure(counts), dpi=100)


def _zipf_figure(counts: Mapping[str, Mapping[int, CountRuns]]) -> Figure:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5 * len(counts), 4), layout="constrained")
    for ax, (level, by_n) in zip(fig.subplots(1, len(counts), squeeze=False)[0], counts.items()):
        for n, runs in by_n.items():
            corners, freqs = runs.corners()
            if len(corners):
                ax.loglog(corners + 1, freqs, label=f"{n}-gram")
        ax.set(title=f"{level} n-grams", xlabel="rank", ylabel="frequency")
        ax.grid(True, which="major", alpha=0.3)
        if ax.lines:
            ax.legend()
    return fig
