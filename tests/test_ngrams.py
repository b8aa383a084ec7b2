"""ngrams stage: exact seed reference counts, streaming == one-shot counting, outputs and errors."""
from __future__ import annotations

import collections
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seqlm.io import atomic_path
from seqlm.ngrams import (CountRuns, NgramError, count_ngrams, count_shard, pack, rank_order,
                          unpack, zipf_exponent)
from seqlm.params import load_params
from seqlm.stages import CORPUS, VOCAB
from seqlm.text import TOKENIZERS, Vocab, read_lines, tokenize
from tasks.ngrams import (SHARDS, ngrams, ngrams_reduce, ngrams_shard, partition_path,
                          shard_plan, table_path)

from conftest import REPO, write_params


@pytest.fixture(scope="module")
def corpus() -> dict[str, tuple[Vocab, np.ndarray]]:
    """Vocabulary and ids per level, built as the preprocess stage does."""
    lines = read_lines(REPO / "data" / "mirror" / "timemachine.txt")
    built = {}
    for level in TOKENIZERS:
        tokens = tokenize(lines, level)
        vocab = Vocab(tokens)
        ids = np.asarray([vocab[t] for line in tokens for t in line], dtype=np.int32)
        built[level] = vocab, ids
    return built


@pytest.fixture
def processed(workdir: Path, corpus) -> Path:
    for level, (vocab, ids) in corpus.items():
        vocab.save(VOCAB[level])
        with atomic_path(CORPUS[level]) as tmp, open(tmp, "wb") as handle:
            np.save(handle, ids)
    return workdir


def top(level: str, n: int, k: int = 10) -> list[tuple]:
    frame = pd.read_parquet(table_path(level, n))
    return [(*row[:n], row[n]) for row in frame.head(k).itertuples(index=False)]


def test_seed_reference_counts_and_outputs(processed: Path) -> None:
    record = ngrams.fn(load_params())

    assert top("word", 1) == [("the", 2261), ("i", 1267), ("and", 1245), ("of", 1155), ("a", 816),
                              ("to", 695), ("was", 552), ("in", 541), ("that", 443), ("my", 440)]
    assert top("word", 2) == [
        ("of", "the", 309), ("in", "the", 169), ("i", "had", 130), ("i", "was", 112),
        ("and", "the", 109), ("the", "time", 102), ("it", "was", 99), ("to", "the", 85),
        ("as", "i", 78), ("of", "a", 73)]
    assert top("word", 3) == [
        ("the", "time", "traveller", 59), ("the", "time", "machine", 30),
        ("the", "medical", "man", 24), ("it", "seemed", "to", 16), ("it", "was", "a", 15),
        ("here", "and", "there", 15), ("seemed", "to", "me", 14), ("i", "did", "not", 14),
        ("i", "saw", "the", 13), ("i", "began", "to", 13)]

    for level, total in (("word", 32_775), ("char", 170_580)):
        for n in (1, 2, 3):
            frame = pd.read_parquet(table_path(level, n))
            tokens = [f"token_{j}" for j in range(1, n + 1)]
            assert list(frame.columns) == [*tokens, "count", "rank"]
            assert frame["count"].dtype == np.int64 and frame["rank"].dtype == np.int64
            assert frame["count"].sum() == total - n + 1      # every window counted once
            assert (frame["rank"] == np.arange(1, len(frame) + 1)).all()
            assert frame["count"].is_monotonic_decreasing
            meta = pq.ParquetFile(table_path(level, n)).metadata.row_group(0)
            assert {meta.column(j).compression for j in range(meta.num_columns)} == {"ZSTD"}
    assert top("char", 1, 3) == [(" ", 29927), ("e", 17838), ("t", 13515)]

    assert Path("data/ngrams/zipf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads(Path("reports/ngrams.json").read_text())
    assert metrics["word_1_distinct"] == 4579 and metrics["char_1_distinct"] == 27
    assert metrics["word_2_distinct"] == 20234 and metrics["word_3_distinct"] == 29882
    # Word frequencies fall roughly as 1/rank (Zipf); longer n-grams fall off more slowly.
    assert 0.9 < metrics["word_1_zipf_exponent"] < 1.2
    assert metrics["word_1_zipf_exponent"] > metrics["word_2_zipf_exponent"] \
        > metrics["word_3_zipf_exponent"] > 0
    assert sorted(str(p) for p in Path("data/ngrams").iterdir()) == sorted(
        [*(str(table_path(lv, n)) for lv in TOKENIZERS for n in (1, 2, 3)), "data/ngrams/zipf.png"])
    # the record carries what the pipeline's MLflow run logs: the metrics and the tables
    assert record["metrics"] == metrics and record["artifacts"] == {"": ["data/ngrams"]}


def test_streaming_is_byte_identical_and_stale_tables_go(processed: Path) -> None:
    write_params(processed, ngrams={"max_n": 5})
    ngrams.fn(load_params())
    whole = {p.name: p.read_bytes() for p in Path("data/ngrams").glob("*.parquet")}
    assert len(whole) == 10

    write_params(processed, ngrams={"max_n": 5, "chunk_tokens": 1000})   # 33 word chunks
    ngrams.fn(load_params())
    assert {p.name: p.read_bytes() for p in Path("data/ngrams").glob("*.parquet")} == whole

    write_params(processed, ngrams={"max_n": 2})
    ngrams.fn(load_params())
    assert sorted(p.name for p in Path("data/ngrams").glob("*.parquet")) == \
        ["char_1.parquet", "char_2.parquet", "word_1.parquet", "word_2.parquet"]
    assert "word_3_distinct" not in json.loads(Path("reports/ngrams.json").read_text())


def test_shard_and_reduce_tasks_then_merge_write_the_same_bytes(processed: Path) -> None:
    """The flow's fan-out (ngrams.shard_tokens): one ngrams_shard task per shard writing its
    partial counts in partitions, one ngrams_reduce task per partition, then the ngrams task
    merging them, as in tests/test_dask.py on a cluster."""
    write_params(processed, ngrams={"max_n": 4})
    ngrams.fn(load_params())
    whole = {p.name: p.read_bytes() for p in Path("data/ngrams").iterdir()}
    write_params(processed, ngrams={"max_n": 4, "shard_tokens": 7_000, "partitions": 3})
    params = load_params()
    plan = shard_plan(params)
    assert [len(plan["word"]), len(plan["char"])] == [5, 25]
    partials = {level: [ngrams_shard.fn(params, level, a, b) for a, b in reversed(bounds)]
                for level, bounds in plan.items()}             # any order
    assert all(Path(path).parent == SHARDS for paths in partials.values() for path in paths)
    partitions = {level: [ngrams_reduce.fn(level, p, paths) for p in range(3)]
                  for level, paths in partials.items()}
    shutil.rmtree("data/ngrams")
    ngrams.fn(params, partitions=partitions)
    assert {p.name: p.read_bytes() for p in Path("data/ngrams").iterdir()} == whole
    assert not SHARDS.exists()                  # merged: the map's and reduce's files go


def test_too_many_shard_tasks_are_refused(processed: Path, monkeypatch) -> None:
    monkeypatch.setattr("tasks.ngrams.MAX_SHARD_TASKS", 20)
    write_params(processed, ngrams={"shard_tokens": 7_000})
    with pytest.raises(NgramError, match=r"ngrams.shard_tokens = 7000: 25 shard tasks for the "
                                         r"170,580 tokens of data/processed/corpus_char.npy "
                                         r"\(at most 20: each is a Prefect task run\); raise"):
        shard_plan(load_params())


def test_unreadable_partial_is_named(processed: Path) -> None:
    SHARDS.mkdir(parents=True)
    (SHARDS / "word-0-10.npz").write_bytes(b"not an archive")
    with pytest.raises(NgramError, match=r"word-0-10.npz: unreadable partial n-gram counts"):
        ngrams_reduce.fn("word", 0, [str(SHARDS / "word-0-10.npz")])
    assert not Path(partition_path("word", 0)).exists()


def test_missing_partition_is_named(processed: Path) -> None:
    with pytest.raises(NgramError, match=r"word-partition-0/1.npy: not a readable .npy array"):
        ngrams.fn(load_params(), partitions={"word": [partition_path("word", 0)], "char": []})
    assert not Path("data/ngrams").exists()


# sha256 (first 16 hex digits) of the stage's outputs on the chapter's corpus with max_n 5, as
# the code before keys of several words wrote them (commit 58d1156), one task or sharded alike.
# Parquet files name the pyarrow that wrote them: the digests hold for that version.
PREVIOUS_OUTPUTS = ("25.0.1", {
    "char_1.parquet": "cf477633629c171f", "char_2.parquet": "9738a38671321a70",
    "char_3.parquet": "eea2bca12b1c394d", "char_4.parquet": "c1dff2d1fa6de41f",
    "char_5.parquet": "1a5e7213bc383a42", "word_1.parquet": "919108dc31a625da",
    "word_2.parquet": "ea4b6831a025543b", "word_3.parquet": "31de01228ff358dd",
    "word_4.parquet": "3ac747adeb53052a", "word_5.parquet": "b24d465d98a0ec1d",
    "ngrams.json": "bb0f7eb4495ed8e5"})


@pytest.mark.skipif(pa.__version__ != PREVIOUS_OUTPUTS[0],
                    reason=f"digests recorded with pyarrow {PREVIOUS_OUTPUTS[0]}")
def test_chapter_outputs_are_the_bytes_the_previous_code_wrote(processed: Path) -> None:
    write_params(processed, ngrams={"max_n": 5})
    ngrams.fn(load_params())
    files = [*Path("data/ngrams").glob("*.parquet"), Path("reports/ngrams.json")]
    assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in files} == \
        PREVIOUS_OUTPUTS[1]


def test_orders_past_a_63_bit_key_are_counted(processed: Path, corpus) -> None:
    """4580**6 > 2**63: the word 6-grams' keys take two int64 words (the old code refused them
    with "do not fit a 63-bit key"); the table is the seed's Counter ranking."""
    write_params(processed, ngrams={"max_n": 6})
    metrics = ngrams.fn(load_params())["metrics"]
    vocab, ids = corpus["word"]
    frame = pd.read_parquet(table_path("word", 6))
    expected = seed_ranking(ids.tolist(), 6)
    assert metrics["word_6_distinct"] == len(frame) == len(expected)
    got = [(tuple(vocab[list(row[:6])]), row[6]) for row in frame.itertuples(index=False)]
    assert got == expected


def test_out_of_vocabulary_id_names_file_and_position(processed: Path, corpus) -> None:
    ngrams.fn(load_params())
    before = table_path("word", 1).read_bytes()
    ids = corpus["char"][1].copy()
    ids[1234] = 28
    np.save(CORPUS["char"], ids)
    with pytest.raises(NgramError, match=r"corpus_char.npy: token id 28 at position 1234 is "
                                         r"outside the vocabulary of 28 tokens"):
        ngrams.fn(load_params())
    assert table_path("word", 1).read_bytes() == before


def test_missing_input_says_to_run_preprocess(workdir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="vocab_word.parquet: not found; run the preproc"):
        ngrams.fn(load_params())


def seed_ranking(ids: list[int], n: int) -> list[tuple[tuple[int, ...], int]]:
    """The seed's way: a Counter of tuples, stable-sorted by count."""
    counter = collections.Counter(zip(*(ids[j:len(ids) - n + 1 + j] for j in range(n))))
    return sorted(counter.items(), key=lambda kv: kv[1], reverse=True)


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(0, 5), max_size=80), max_n=st.integers(1, 5),
       chunk=st.integers(1, 30))
def test_chunked_counting_equals_one_shot_and_seed(ids: list[int], max_n: int, chunk: int) -> None:
    array = np.asarray(ids, dtype=np.int32)
    one_shot = count_ngrams(array, max_n, 6, chunk_tokens=max(len(ids), 1))
    chunked = count_ngrams(array, max_n, 6, chunk_tokens=chunk)
    for n in range(1, max_n + 1):
        a, b = one_shot[n], chunked[n]
        assert np.array_equal(a.keys, b.keys) and np.array_equal(a.counts, b.counts)
        assert np.array_equal(a.first, b.first)
        ranked = b.ranked()
        rows = unpack(ranked.keys, n, 6)
        got = [(tuple(map(int, row)), int(c)) for row, c in zip(rows, ranked.counts)]
        assert got == seed_ranking(ids, n)


@pytest.mark.parametrize("start, stop", [(0, 5000), (1000, 3000), (4990, 5000)])
def test_levels_derived_from_the_dense_top_level_equal_np_unique(start: int, stop: int) -> None:
    # 3**5 = 243 bins: every level is dense, the lower ones summed from the 5-grams; at the
    # sequence's end each lower level has windows the 5-grams do not extend.
    ids = np.random.default_rng(1).integers(0, 3, 5000).astype(np.int32)
    tables = count_shard(ids, start, stop, 5, 3)
    for n in range(1, 6):
        last = min(stop, len(ids) - n + 1)
        [keys] = pack([ids[start + j:last + j] for j in range(n)], 3)
        distinct, first, counts = np.unique(keys, return_index=True, return_counts=True)
        table = tables[n]
        assert np.array_equal(table.keys, [distinct]) and np.array_equal(table.counts, counts)
        assert np.array_equal(table.first, first + start)


def test_rank_order_packed_and_lexsort_paths_agree() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 50, 10_000)
    first = rng.permutation(100_000)[:10_000].astype(np.int64)
    expected = np.lexsort((first, -counts))
    assert np.array_equal(rank_order(counts, first), expected)
    far = first + (1 << 50)               # too many bits to pack: the lexsort fallback
    assert np.array_equal(rank_order(counts, far), expected)


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(1, 6), max_size=60), cuts=st.lists(st.integers(0, 60)))
def test_count_runs_keep_the_counts_and_the_staircase_however_cut(counts: list[int],
                                                                  cuts: list[int]) -> None:
    ranked = np.array(sorted(counts, reverse=True), dtype=np.int64)
    runs = CountRuns()
    for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(ranked)]):
        runs.add(ranked[a:max(a, b)])
    assert np.array_equal(runs.counts(), ranked)
    assert np.array_equal(runs.counts(2), ranked[ranked >= 2])
    change = ranked[1:] != ranked[:-1]       # the corners as the plot drew them from every count
    corners = np.flatnonzero(np.r_[True, change] | np.r_[change, True]) if len(ranked) else []
    index, values = runs.corners()
    assert np.array_equal(index, corners) and np.array_equal(values, ranked[corners])


def test_zipf_exponent_recovers_a_power_law() -> None:
    ranks = np.arange(1, 5000)
    counts = np.round(1e5 * ranks ** -1.1).astype(np.int64)
    assert zipf_exponent(counts) == pytest.approx(1.1, abs=0.02)
    assert zipf_exponent(np.array([7, 1, 1, 1])) is None       # one rank with count >= 2


def test_counting_is_vectorised_on_two_million_tokens() -> None:
    # Zipf-like ids, as in text: a per-window Python loop would take tens of seconds here.
    rng = np.random.default_rng(0)
    ids = np.minimum(rng.zipf(1.3, 2_000_000), 4999).astype(np.int32) - 1
    tables = count_ngrams(ids, 5, 4999, chunk_tokens=700_000)
    for n, table in tables.items():
        assert table.counts.sum() == len(ids) - n + 1
        assert np.all(np.diff(table.keys) > 0)
    assert tables[5].ranked().counts[0] > 1000        # the all-"0" 5-gram is frequent
