"""N-grams of real vocabularies: a million words at n = 5 (keys of two int64 words past n = 3)
and an alphabet of 400 symbols at n = 6, in uint16 ids and any Unicode: the seed's Counter
ranking, sharded == one process, byte-identical Parquet whatever the id dtype, and the stage
itself, where the old code stopped at "do not fit a 63-bit key"."""
from __future__ import annotations

import collections
import io
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from seqlm.io import atomic_path
from seqlm.ngrams import (NgramTable, count_ngrams, count_shard, load_partial, load_ranked,
                          merge_ranked, reduce_partials, save_partial, save_ranked, shard_bounds,
                          split_partitions, unpack, word_spans, write_parquet)
from seqlm.params import load_params
from seqlm.runtime.preflight import check_corpus
from seqlm.stages import CORPUS, VOCAB
from seqlm.text import Vocab
from tasks.ngrams import SHARDS, ngrams, ngrams_reduce, ngrams_shard, shard_plan, table_path

from conftest import REPO, write_params

WORDS = 10**6
# Scripts a user's own text brings (clean: none): accents, Greek, Cyrillic, CJK, emoji (outside
# the BMP), combining marks, zero-width joiners, and the ASCII the chapter keeps.
SCRIPTS = ["", "é", "Ωμέγα", "кот", "東京", "🙂", "e\u0301", "a\u200db", "ß", "ŉ"]


def alphabet() -> list[str]:
    """400 characters: printable ASCII, newline and tab, then letters of other scripts."""
    ranges = [(0x20, 0x7F), (0xC0, 0x100), (0x391, 0x3CA), (0x410, 0x450), (0x4E00, 0x4E40),
              (0x1F600, 0x1F650)]
    chars = ["\n", "\t"] + [chr(c) for a, b in ranges for c in range(a, b)]
    return chars[:400]


def zipf_ids(rng: np.random.Generator, count: int, vocab: int, exponent: float = 1.0
             ) -> np.ndarray:
    """`count` ids in 1..vocab-1 drawn with Zipf's law over their rank (id 1 the most frequent)."""
    weights = 1 / np.arange(1, vocab, dtype=np.float64) ** exponent
    cdf = np.cumsum(weights)
    return np.searchsorted(cdf, rng.random(count) * cdf[-1]).astype(np.int64) + 1


@pytest.fixture(scope="module")
def levels() -> dict[str, tuple[list[str], np.ndarray, int]]:
    """level -> (tokens by id, ids, max_n): a million words (int32 ids up to 10**6, the last one
    included) at n = 5, and 400 characters (uint16 ids) at n = 6."""
    rng = np.random.default_rng(0)
    words = ["<unk>"] + [f"{SCRIPTS[i % len(SCRIPTS)]}w{i}" for i in range(1, WORDS + 1)]
    word_ids = zipf_ids(rng, 60_000, len(words))
    word_ids[5:10] = word_ids[20_000:20_005] = WORDS     # the largest id, as a 5-gram twice
    chars = ["<unk>"] + alphabet()
    char_ids = zipf_ids(rng, 60_000, len(chars), exponent=0.8).astype(np.uint16)
    return {"word": (words, word_ids.astype(np.int32), 5), "char": (chars, char_ids, 6)}


def seed_ranking(ids: list[int], n: int) -> list[tuple[tuple[int, ...], int]]:
    """The seed's way: a Counter of tuples, stable-sorted by count."""
    counter = collections.Counter(zip(*(ids[j:len(ids) - n + 1 + j] for j in range(n))))
    return sorted(counter.items(), key=lambda kv: kv[1], reverse=True)


def parquet(table: NgramTable, tokens: list[str]) -> bytes:
    buffer = io.BytesIO()
    write_parquet(table, tokens, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("level", ["word", "char"])
def test_counts_are_the_seed_counter_ranking(levels, level: str) -> None:
    tokens, ids, max_n = levels[level]
    tables = count_ngrams(ids, max_n, len(tokens), chunk_tokens=25_000)
    listed = ids.tolist()
    for n, table in tables.items():
        ranked = table.ranked()
        got = [(tuple(row), int(count))
               for row, count in zip(unpack(ranked.keys, n, len(tokens)).tolist(), ranked.counts)]
        assert got == seed_ranking(listed, n), (level, n)
        assert len(table.keys) == len(word_spans(len(tokens), n))
    if level == "word":         # a million words: 3 ids per 63-bit word, 4- and 5-grams take two
        assert [len(tables[n].keys) for n in range(1, 6)] == [1, 1, 1, 2, 2]
        top = tables[5].ranked()
        assert unpack(top.keys[:, :1], 5, len(tokens)).tolist() == [[WORDS] * 5]
        assert top.counts[0] == 2 and top.first[0] == 5


@pytest.mark.parametrize("level", ["word", "char"])
def test_sharded_through_files_equals_one_process(levels, level: str, tmp_path: Path) -> None:
    """Shards of any size, cut in partitions, reduced in any order through their files and
    merged block by block: the one-process tables, and the same Parquet bytes."""
    tokens, ids, max_n = levels[level]
    single = count_ngrams(ids, max_n, len(tokens))
    files = [save_partial(split_partitions(count_shard(ids, a, b, max_n, len(tokens)), 3),
                          tmp_path / f"{a}.npz") for a, b in shard_bounds(len(ids), 7_777)]
    for p in range(3):
        random.Random(p).shuffle(files)
        reduced = reduce_partials(load_partial(path, p) for path in files)
        save_ranked({n: table.ranked() for n, table in reduced.items()}, tmp_path / f"part-{p}")
    for n, table in single.items():
        parts = [load_ranked(tmp_path / f"part-{p}", n) for p in range(3)]
        merged = NgramTable.concat(n, list(merge_ranked(parts, 5_000)))
        ranked = table.ranked()
        for column in ("keys", "counts", "first"):
            assert np.array_equal(getattr(merged, column), getattr(ranked, column)), (n, column)
        assert parquet(NgramTable.concat(n, list(merge_ranked(parts, 5_000))), tokens) == \
            parquet(ranked, tokens)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64, np.uint64])
def test_any_integer_dtype_gives_the_same_tables_and_bytes(levels, dtype) -> None:
    tokens, ids, _ = levels["char"]
    small = ids[:20_000] % 250                        # ids that a uint8 holds too
    reference = count_ngrams(small.astype(np.int64), 6, 250, chunk_tokens=3_000)
    tables = count_ngrams(small.astype(dtype), 6, 250, chunk_tokens=3_000)
    for n in reference:
        assert np.array_equal(tables[n].keys, reference[n].keys)
        assert np.array_equal(tables[n].counts, reference[n].counts)
        assert parquet(tables[n].ranked(), tokens[:250]) == parquet(reference[n].ranked(),
                                                                    tokens[:250])


@pytest.fixture
def processed(workdir: Path, levels) -> Path:
    """The preprocess outputs of a text of a million words and 400 characters (uint16 ids, as
    preprocess writes them for a text of every character)."""
    for level, (tokens, ids, _) in levels.items():
        vocab = Vocab()
        vocab.idx_to_token, vocab.freqs = tokens, np.bincount(ids, minlength=len(tokens)).tolist()
        vocab.save(VOCAB[level])
        with atomic_path(CORPUS[level]) as tmp, open(tmp, "wb") as handle:
            np.save(handle, ids)
    return workdir


def test_the_stage_counts_a_million_words_at_n_5_in_one_task_and_sharded(processed: Path,
                                                                          levels) -> None:
    write_params(processed, ngrams={"max_n": 5}, evaluate={"ngram_orders": [6]})
    params = load_params()
    vocabs = {level: Vocab.load(VOCAB[level]) for level in levels}
    assert len(vocabs["word"]) == WORDS + 1
    check_corpus(params, np.load(CORPUS["char"]), vocabs)     # no "63-bit key" refusal
    ngrams.fn(params)
    whole = {p.name: p.read_bytes() for p in Path("data/ngrams").iterdir()}
    metrics = json.loads(Path("reports/ngrams.json").read_text())

    words, ids, _ = levels["word"]
    frame = pd.read_parquet(table_path("word", 5))
    expected = seed_ranking(ids.tolist(), 5)
    assert metrics["word_5_distinct"] == len(frame) == len(expected)
    assert [tuple(row[:5]) for row in frame.head(50).itertuples(index=False)] == \
        [tuple(words[i] for i in gram) for gram, _ in expected[:50]]
    chars = pd.read_parquet(table_path("char", 1))           # any Unicode, as it was
    assert set(chars["token_1"]) == {levels["char"][0][i] for i in np.unique(levels["char"][1])}

    write_params(processed, ngrams={"max_n": 5, "shard_tokens": 13_000, "partitions": 4})
    params = load_params()
    plan = shard_plan(params)
    partials = {level: [ngrams_shard.fn(params, level, a, b) for a, b in bounds]
                for level, bounds in plan.items()}
    partitions = {level: [ngrams_reduce.fn(level, p, paths) for p in range(4)]
                  for level, paths in partials.items()}
    shutil.rmtree("data/ngrams")
    ngrams.fn(params, partitions=partitions)
    assert {p.name: p.read_bytes() for p in Path("data/ngrams").iterdir()} == whole
    assert not SHARDS.exists()


def test_the_benchmark_corpus_is_seeded_and_what_preprocess_would_write(tmp_path: Path) -> None:
    """bench/ngrams.py's realistic corpus: the same bytes for the same seed, ids that spell its
    text (words split on whitespace, every character kept), vocabularies by frequency."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from ngrams import generate_zipf
    finally:
        sys.path.remove(str(REPO / "bench"))
    made = [generate_zipf(300_000, 20_000, 1.0, 7, tmp_path / name) for name in ("a", "b")]
    files = ["text.txt", *(f"data/processed/{name}" for name in
                           ("vocab_word.parquet", "vocab_char.parquet", "corpus_word.npy",
                            "corpus_char.npy"))]
    assert all((made[0] / f).read_bytes() == (made[1] / f).read_bytes() for f in files)
    text = (made[0] / "text.txt").read_text(encoding="utf-8")
    assert 300_000 <= len(text.encode()) < 300_100 and any(ord(c) > 127 for c in text)
    for level, pieces in (("word", text.split()), ("char", list(text))):
        vocab = Vocab.load(made[0] / f"data/processed/vocab_{level}.parquet")
        ids = np.load(made[0] / f"data/processed/corpus_{level}.npy")
        assert ids.dtype == (np.int32 if level == "word" else np.uint16)
        assert vocab.to_tokens(ids.tolist()) == pieces
        assert vocab.freqs[1:] == sorted(vocab.freqs[1:], reverse=True)
        assert Vocab(pieces).idx_to_token == vocab.idx_to_token     # as preprocess orders them
    assert generate_zipf(300_000, 20_000, 1.0, 7, made[0]) == made[0]   # found, not redone
