"""Sharded n-gram counting: any shards, reduced in any order, give exactly the single-process
tables (keys, counts, first positions, ranks) and byte-identical Parquet files."""
from __future__ import annotations

import io
import random

import numpy as np
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from seqlm.ngrams import (NgramTable, count_ngrams, count_shard, reduce_partials, shard_bounds,
                          to_arrow, write_parquet)


def parquet_bytes(table: NgramTable, vocab_size: int, rows: int = 1 << 20) -> bytes:
    buffer = io.BytesIO()
    write_parquet(table, [f"t{i}" for i in range(vocab_size)], buffer, rows)
    return buffer.getvalue()


def assert_same(a: dict[int, NgramTable], b: dict[int, NgramTable], vocab_size: int) -> None:
    assert sorted(a) == sorted(b)
    for n in a:
        for column in ("keys", "counts", "first"):
            assert np.array_equal(getattr(a[n], column), getattr(b[n], column)), (n, column)
        assert parquet_bytes(a[n].ranked(), vocab_size) == parquet_bytes(b[n].ranked(), vocab_size)


@st.composite
def streams(draw):
    """Token ids over vocabularies from 1 to 6000 tokens (so every n <= 5 fits a 63-bit key),
    mixing a few frequent ids (repeated n-grams) with any id of the vocabulary."""
    vocab_size = draw(st.one_of(st.integers(1, 8), st.integers(9, 6000)))
    frequent = st.integers(0, min(vocab_size, 4) - 1)
    ids = draw(st.lists(st.one_of(frequent, st.integers(0, vocab_size - 1)), max_size=300))
    max_n = draw(st.integers(1, 5))
    shard = draw(st.integers(1, max(len(ids), 1) + 5))
    return np.asarray(ids, dtype=np.int32), vocab_size, max_n, shard


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
    # A vocabulary of 2**40 leaves room for shards of 2**10 windows only.
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 30, 3_000) * (1 << 35)
    one = count_shard(ids, 0, 3_000, 1, 1 << 40)[1]
    small = count_ngrams(ids >> 35, 1, 30)[1]          # the same ids, a small vocabulary
    assert np.array_equal(one.keys, small.keys << 35)
    assert np.array_equal(one.counts, small.counts) and np.array_equal(one.first, small.first)


def test_parquet_written_by_row_groups_is_pq_write_table() -> None:
    rng = np.random.default_rng(3)
    table = count_ngrams(rng.integers(0, 9, 2_000), 2, 9)[2].ranked()
    whole = io.BytesIO()
    pq.write_table(to_arrow(table, [f"t{i}" for i in range(9)]), whole, compression="zstd",
                   row_group_size=7)
    assert parquet_bytes(table, 9, rows=7) == whole.getvalue()
    groups = pq.ParquetFile(io.BytesIO(whole.getvalue())).metadata.num_row_groups
    assert groups == -(-len(table) // 7) > 1
