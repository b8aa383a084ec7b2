"""Sharded n-gram counting: any shards, cut into any number of partitions, reduced in any order
and merged, give exactly the single-process tables (keys, counts, first positions, ranks) and
byte-identical Parquet files; so do a shard's groups of windows, on any number of threads."""
from __future__ import annotations

import io
import random
from collections.abc import Iterable
from unittest import mock

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import seqlm.ngrams
from seqlm.ngrams import (NgramError, NgramTable, count_ngrams, count_shard, load_partial, load_ranked,
                          merge_ranked, pack, reduce_partials, save_partial, save_ranked, shard_bounds,
                          split_partitions, to_arrow, unpack, write_parquet)


# Parquet bytes are compared for vocabularies up to this size (a token list of 2**62 is not
# built: tests/test_ngrams_vocabularies.py writes the tables of a million words).
LISTED_VOCAB = 6000


def parquet_bytes(table: NgramTable | Iterable[NgramTable], vocab_size: int,
                  rows: int = 1 << 20) -> bytes:
    buffer = io.BytesIO()
    write_parquet(table, [f"t{i}" for i in range(vocab_size)], buffer, rows)
    return buffer.getvalue()


def assert_same(a: dict[int, NgramTable], b: dict[int, NgramTable], vocab_size: int) -> None:
    assert sorted(a) == sorted(b)
    for n in a:
        for column in ("keys", "counts", "first"):
            assert np.array_equal(getattr(a[n], column), getattr(b[n], column)), (n, column)
        if vocab_size <= LISTED_VOCAB:
            assert parquet_bytes(a[n].ranked(), vocab_size) == \
                parquet_bytes(b[n].ranked(), vocab_size)


def unique_tables(ids: np.ndarray, max_n: int, vocab_size: int) -> dict[int, NgramTable]:
    """The tables by np.unique of every window's packed key words: an independent reference."""
    tables = {}
    for n in range(1, max_n + 1):
        count = max(len(ids) - n + 1, 0)
        keys = pack([ids[j:j + count].astype(np.int64) for j in range(n)], vocab_size)
        keys, first, counts = np.unique(keys, axis=1, return_index=True, return_counts=True)
        tables[n] = NgramTable(n, keys, counts.astype(np.int64), first.astype(np.int64))
    return tables


@st.composite
def streams(draw):
    """Token ids over vocabularies from 1 token to 2**62 (keys of one int64 word up to several
    per n-gram), mixing a few frequent ids (repeated n-grams) with any id of the vocabulary."""
    vocab_size = draw(st.one_of(st.integers(1, 8), st.integers(9, 6000),
                                st.sampled_from([10**6, 2**31, 2**40, 2**62])))
    frequent = st.integers(0, min(vocab_size, 4) - 1)
    ids = draw(st.lists(st.one_of(frequent, st.integers(0, vocab_size - 1)), max_size=300))
    max_n = draw(st.integers(1, 6))
    shard = draw(st.integers(1, max(len(ids), 1) + 5))
    return np.asarray(ids, dtype=np.int64), vocab_size, max_n, shard


@settings(max_examples=300, deadline=None)
@given(streams(), st.randoms(use_true_random=False))
def test_sharded_equals_single_process(stream, rng: random.Random) -> None:
    ids, vocab_size, max_n, shard = stream
    single = count_ngrams(ids, max_n, vocab_size, chunk_tokens=max(len(ids), 1))
    partials = [count_shard(ids, start, stop, max_n, vocab_size)
                for start, stop in shard_bounds(len(ids), shard)]
    rng.shuffle(partials)                    # tasks finish in any order
    assert_same(reduce_partials(partials), single, vocab_size)
    for n, table in single.items():         # every window counted once
        assert table.counts.sum() == max(len(ids) - n + 1, 0)


@settings(max_examples=200, deadline=None)
@given(streams(), st.integers(1, 30), st.integers(1, 4))
def test_groups_and_threads_give_the_same_tables(stream, group_windows: int, threads: int
                                                  ) -> None:
    """A shard's sorted levels in groups of windows by first id, of any size (down to one
    window), counted on any number of threads: the same tables as np.unique of the windows."""
    ids, vocab_size, max_n, shard = stream
    with mock.patch.object(seqlm.ngrams, "GROUP_WINDOWS", group_windows):
        grouped = count_ngrams(ids, max_n, vocab_size, chunk_tokens=shard, threads=threads)
    assert_same(grouped, unique_tables(ids, max_n, vocab_size), vocab_size)


@pytest.mark.parametrize("group_windows", [1 << 20, 5_000, 97])
@pytest.mark.parametrize("chunk", [300_000, 77_777])
def test_threaded_counting_of_word_like_ids_equals_one_thread(group_windows: int, chunk: int
                                                               ) -> None:
    """Zipf-like ids as in text (frequent first ids make groups of their own), 2 or 3 threads
    against 1: the same tables, which are those of np.unique."""
    rng = np.random.default_rng(4)
    ids = (np.minimum(rng.zipf(1.2, 300_000), 3000) - 1).astype(np.int32)
    reference = unique_tables(ids, 5, 3000)
    with mock.patch.object(seqlm.ngrams, "GROUP_WINDOWS", group_windows):
        for threads in (1, 2, 3):
            assert_same(count_ngrams(ids, 5, 3000, chunk, threads), reference, 3000)


@settings(max_examples=150, deadline=None)
@given(streams(), st.integers(1, 9), st.integers(1, 40), st.integers(1, 50),
       st.randoms(use_true_random=False))
def test_partitioned_reduce_and_merge_equal_single_process(
        tmp_path_factory, stream, partitions: int, block: int, rows: int,
        rng: random.Random) -> None:
    """The flow's map, reduce and merge through their files: the shards cut into partitions,
    each partition reduced from the shards in any order and ranked, the ranked partitions
    merged block by block: the same ranked tables, and the same Parquet bytes for any row
    group size."""
    ids, vocab_size, max_n, shard = stream
    folder = tmp_path_factory.mktemp("shards")
    single = count_ngrams(ids, max_n, vocab_size, chunk_tokens=max(len(ids), 1))
    files = [save_partial(split_partitions(count_shard(ids, a, b, max_n, vocab_size), partitions),
                          folder / f"{a}.npz") for a, b in shard_bounds(len(ids), shard)]
    for p in range(partitions):
        rng.shuffle(files)
        reduced = reduce_partials(load_partial(path, p) for path in files)
        save_ranked({n: table.ranked() for n, table in reduced.items()}, folder / f"part-{p}")
    for n, table in single.items():
        parts = [load_ranked(folder / f"part-{p}", n) for p in range(partitions)]
        assert sum(map(len, parts)) == len(table)           # each n-gram in one partition
        merged = NgramTable.concat(n, list(merge_ranked(parts, block)))
        ranked = table.ranked()
        for column in ("keys", "counts", "first"):
            assert np.array_equal(getattr(merged, column), getattr(ranked, column)), (n, column)
        if vocab_size <= LISTED_VOCAB:
            assert parquet_bytes(merge_ranked(parts, block), vocab_size, rows) == \
                parquet_bytes(ranked, vocab_size, rows)


def test_partitions_spread_frequent_leading_tokens() -> None:
    """A hash, not the leading token, picks the partition: n-grams that all start with the
    same word still spread over every partition."""
    keys = np.arange(1000, dtype=np.int64) + 7 * 5000          # 2-grams "7 x", x = 0..999
    table = NgramTable(2, keys[None], np.ones(1000, np.int64), np.arange(1000, dtype=np.int64))
    sizes = [len(part[2]) for part in split_partitions({2: table}, 8)]
    assert sum(sizes) == 1000 and min(sizes) > 80
    # keys of two words (6-grams of a million words): "7 7 7 7 7 x", x = 0..999
    words = np.vstack([np.full(1000, pack([np.full(1, 7)] * 3, 10**6)[0, 0]),
                       pack([np.full(1000, 7)] * 2 + [np.arange(1000)], 10**6)[0]])
    table = NgramTable(6, words, np.ones(1000, np.int64), np.arange(1000, dtype=np.int64))
    sizes = [len(part[6]) for part in split_partitions({6: table}, 8)]
    assert sum(sizes) == 1000 and min(sizes) > 80


def test_shards_cover_the_sequence_once() -> None:
    assert shard_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_bounds(8, 4) == [(0, 4), (4, 8)]
    assert shard_bounds(0, 4) == [(0, 0)]


def test_count_shard_reads_a_memory_mapped_file(tmp_path) -> None:
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50, 5_000).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    partials = [count_shard(tmp_path / "ids.npy", a, b, 4, 50) for a, b in shard_bounds(5_000, 777)]
    assert_same(reduce_partials(partials), count_ngrams(ids, 4, 50, chunk_tokens=5_000), 50)


def test_shard_too_large_for_local_codes_is_counted_in_parts() -> None:
    # A vocabulary of 2**52 leaves room for shards of 2**11 windows only (code = a prefix code
    # below the shard's windows times the vocabulary size, plus an id).
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 30, 3_000) * (1 << 47)
    one = count_shard(ids, 0, 3_000, 2, 1 << 52)
    small = count_ngrams(ids >> 47, 2, 30)            # the same ids, a small vocabulary
    assert np.array_equal(one[1].keys, small[1].keys << 47)
    assert np.array_equal(unpack(one[2].keys, 2, 1 << 52), unpack(small[2].keys, 2, 30) << 47)
    for n in (1, 2):
        assert np.array_equal(one[n].counts, small[n].counts)
        assert np.array_equal(one[n].first, small[n].first)


def test_parquet_written_by_row_groups_is_pq_write_table() -> None:
    rng = np.random.default_rng(3)
    table = count_ngrams(rng.integers(0, 9, 2_000), 2, 9)[2].ranked()
    whole = io.BytesIO()
    pq.write_table(to_arrow(table, [f"t{i}" for i in range(9)]), whole, compression="zstd",
                   row_group_size=7)
    assert parquet_bytes(table, 9, rows=7) == whole.getvalue()
    groups = pq.ParquetFile(io.BytesIO(whole.getvalue())).metadata.num_row_groups
    assert groups == -(-len(table) // 7) > 1


def test_shard_of_a_truncated_corpus_file_is_named(tmp_path) -> None:
    np.save(tmp_path / "ids.npy", np.arange(1_000, dtype=np.int32) % 7)
    data = (tmp_path / "ids.npy").read_bytes()
    (tmp_path / "ids.npy").write_bytes(data[:-400])            # the last 100 ids are gone
    assert len(count_shard(tmp_path / "ids.npy", 0, 800, 2, 7)[1]) == 7
    with pytest.raises(NgramError, match=r"ids.npy: truncated .npy array \(0 of 100 elements"):
        count_shard(tmp_path / "ids.npy", 900, 1_000, 2, 7)
