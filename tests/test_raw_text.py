"""The user's own text as it is (preprocess.clean: none): every character kept, a byte-order mark
and CRLF read, compact ids, the held-out test split, and a small raw-text run end to end."""
from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from seqlm.generate import generate
from seqlm.protocol import SplitError, heldout_text, split_of
from seqlm.text import (CorpusError, Vocab, char_dtype, count_tokens, read_text, write_corpus)

from conftest import write_params

# Accents, a dash, curly quotes, a euro sign, digits, a tab, CRLF line ends, a byte-order mark.
RAW = ("\ufeffFirst Citizen:\r\nÇa coûte 5 € — “très” cher!\r\n\r\n"
       "Über\t42 Straßen…\r\nthe end")
TEXT = RAW.removeprefix("\ufeff").replace("\r\n", "\n")


def preprocess(path: Path, out: Path, chunk_bytes: int = 1 << 22) -> dict[str, Vocab]:
    vocabs = {level: Vocab(freqs) for level, freqs in
              count_tokens(path, chunk_bytes, clean="none").items()}
    write_corpus(path, vocabs, out / "lines.txt",
                 {level: out / f"corpus_{level}.npy" for level in vocabs}, chunk_bytes,
                 clean="none")
    return vocabs


@pytest.mark.parametrize("chunk_bytes", [5, 1 << 22])
def test_every_character_is_kept_and_read_back(tmp_path: Path, chunk_bytes: int) -> None:
    path = tmp_path / "raw.txt"
    path.write_bytes(RAW.encode("utf-8"))
    vocabs = preprocess(path, tmp_path, chunk_bytes)
    chars = np.load(tmp_path / "corpus_char.npy")
    assert chars.dtype == np.uint16                       # 2 bytes a character
    assert "".join(vocabs["char"].to_tokens(chars.tolist())) == TEXT
    assert read_text(path, clean="none") == TEXT
    assert (tmp_path / "lines.txt").read_text(encoding="utf-8") == TEXT
    assert "\ufeff" not in vocabs["char"].token_to_idx and "\r" not in vocabs["char"].token_to_idx
    counts = collections.Counter(TEXT)                    # descending, ties by first appearance
    expected = sorted(counts, key=lambda c: (-counts[c], TEXT.index(c)))
    assert vocabs["char"].idx_to_token == ["<unk>", *expected]
    words = np.load(tmp_path / "corpus_word.npy")
    assert vocabs["word"].to_tokens(words.tolist()) == TEXT.split()   # case and punctuation kept


def test_the_chapters_cleaning_is_unchanged_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "raw.txt"
    path.write_bytes(RAW.encode("utf-8"))
    assert read_text(path) == "first citizena co te tr s cherber stra enthe end"


@pytest.mark.parametrize("content, message", [
    (b"", "corpus is empty"),
    ("\ufeff".encode(), "corpus is empty"),
    (b" \t\r\n\n  \n", "corpus holds only whitespace, nothing to tokenize"),
    (b"good line\nbad \xff byte\n", r"corpus is not UTF-8 \(invalid byte at offset 14\)"),
    (b"text\x00more", "corpus is a binary file"),
])
def test_a_file_that_is_no_text_is_one_line_naming_it(tmp_path: Path, content: bytes,
                                                      message: str) -> None:
    path = tmp_path / "raw.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=f"^{path}: {message}"):
        count_tokens(path, clean="none")


def test_an_alphabet_too_large_for_the_ids_names_the_fix(tmp_path: Path) -> None:
    assert char_dtype("none", 65_536) == np.uint16
    with pytest.raises(CorpusError, match=r"^corpus\.txt: its 70,001 distinct characters do not "
                                          r"fit the uint16 .* raise preprocess\.min_freq"):
        char_dtype("none", 70_001, "corpus.txt")
    assert char_dtype("letters", 70_001) == np.int32       # the chapter's files, unchanged


def test_the_test_split_is_the_corpus_end_and_never_trained_on() -> None:
    split = split_of(1_000, None, 100, 50)
    assert (split.train_end, split.val_start, split.val_end) == (850, 850, 950)
    assert (split.test_start, split.test_end) == (950, 1_000)
    fixed = split_of(1_000, 600, 100, 50)                 # a gap between validation and test
    assert (fixed.train_end, fixed.val_end, fixed.test_start) == (600, 700, 950)
    text, first = heldout_text(np.arange(1_000), fixed)
    assert first == 64 and text[first:].tolist() == list(range(950, 1_000))
    assert heldout_text(np.arange(1_000), split_of(1_000, 600, 100)) is None
    with pytest.raises(SplitError, match=r"^preprocess\.train_tokens \+ preprocess\.val_tokens \+ "
                                         r"preprocess\.test_tokens = 900 \+ 100 \+ 50 exceeds "
                                         "the corpus of 1000 tokens"):
        split_of(1_000, 900, 100, 50)
    with pytest.raises(SplitError, match=r"^preprocess\.val_tokens \+ preprocess\.test_tokens = "
                                         r"900 \+ 100 leaves no training text"):
        split_of(1_000, None, 900, 100)


def test_a_prefix_is_read_as_the_models_text_was() -> None:
    vocab = Vocab(list("First Citizen:\n"))
    model = torch.nn.Module()
    with pytest.raises(ValueError, match=r"has characters the model's vocabulary lacks: 'x'$"):
        next(generate("First Cx", 5, model, vocab, "cpu", clean="none"))
    # the chapter's models read lower-case letters and spaces: the same prefix is folded
    with pytest.raises(ValueError, match=r"lacks: 'cf' \(its text was lower-cased letters"):
        next(generate("First Ci", 5, model, vocab, "cpu"))


# --- a raw-text run, end to end ---------------------------------------------------------------

RAW_RUN = dict(
    preprocess={"clean": "none", "train_tokens": None, "val_tokens": 3_000, "test_tokens": 2_000},
    ngrams={"max_n": 3},
    train_ar={"epochs": 1},
    train_lm={"models": ["lstm"], "hidden": 32, "embedding": 8, "batch_size": 8,
              "num_steps": 32, "optimizer": "adamw", "weight_decay": 0.01, "lr": 0.01,
              "max_steps": 40, "eval_every": 20, "warmup_steps": 5, "lr_schedule": "cosine",
              "checkpoint_every": 1},
    evaluate={"ngram_orders": [3, 6], "prefixes": ["First Citizen:\n"], "num_chars": 20},
)


@pytest.mark.slow
def test_a_raw_text_run_keeps_its_characters_end_to_end(workdir: Path, prefect_server,
                                                        monkeypatch) -> None:
    from flows.pipeline import pipeline
    from seqlm.cli import app
    # The chapter's book as the user has it, with a byte-order mark, CRLF line ends and accents.
    book = (workdir / "data/mirror/timemachine.txt").read_text(encoding="utf-8")[:40_000]
    book = book.replace("Time Traveller", "Time Travéller")
    (workdir / "data/mirror/book.txt").write_bytes(
        ("\ufeff" + book.replace("\n", "\r\n")).encode("utf-8"))
    write_params(workdir, download={"sources": ["data/mirror/book.txt"], "checksum": None,
                                    "out": "data/raw/book.txt"}, **RAW_RUN)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    states = pipeline(params_file="params.yaml", record_dvc=False)
    assert set(states.values()) == {"Completed"}, states

    text = book.replace("\r\n", "\n")
    vocab = Vocab.load(workdir / "data/processed/vocab_char.parquet")
    ids = np.load(workdir / "data/processed/corpus_char.npy")
    assert "".join(vocab.to_tokens(ids.tolist())) == text
    assert {"T", "é", ",", "\n"} <= vocab.token_to_idx.keys()
    # n-grams over every character, as collections.Counter counts them
    for n in (1, 3):
        table = pd.read_parquet(workdir / f"data/ngrams/char_{n}.parquet")
        token_columns = [c for c in table.columns if c not in ("count", "rank")]
        counted = collections.Counter(tuple(text[i:i + n]) for i in range(len(text) - n + 1))
        got = {tuple(row[:n]): row[n] for row in
               table[token_columns + ["count"]].itertuples(index=False)}
        assert got == dict(counted)

    summary = pd.read_csv(workdir / "reports/summary.csv")
    assert list(summary["model"]) == ["lstm", "kneser_ney_3gram", "kneser_ney_6gram", "unigram"]
    assert {"steps", "best_step", "val_nats_best", "val_bits_best", "test_ppl", "test_nats",
            "test_bits"} <= set(summary.columns)
    assert (summary["scored_tokens"] == 3_000).all()
    for row in summary.to_dict("records"):
        assert row["val_nats_best"] == pytest.approx(math.log(row["val_ppl_best"]), rel=1e-3)
        assert row["val_bits_best"] == pytest.approx(math.log2(row["val_ppl_best"]), rel=1e-3)
        assert row["test_nats"] == pytest.approx(math.log(row["test_ppl"]), rel=1e-3)
    lstm = summary.set_index("model").loc["lstm"]
    assert lstm["steps"] == 40 and lstm["best_step"] in (20, 40)
    metrics = json.loads((workdir / "reports/metrics/lstm.json").read_text())
    assert {"best_step", "val_nats_best", "val_bits_best", "test_ppl"} <= metrics.keys()
    history = pd.read_csv(workdir / "models/lstm/history.csv")
    assert list(history.columns) == ["step", "epoch", "train_perplexity", "val_perplexity"]
    # the test text never reached training: the training split ends before validation
    meta = json.loads((workdir / "models/lstm/meta.json").read_text())
    assert meta["run_config"]["train_tokens"] == len(text) - 5_000
    assert meta["params"]["preprocess"]["clean"] == "none"

    # the registry follows the setting; its model keeps the case of a prompt
    client = mlflow.MlflowClient(uri)
    version = client.get_model_version_by_alias("book-raw-lstm", "champion")
    assert version.tags["clean"] == "none"
    served = mlflow.pyfunc.load_model("models:/book-raw-lstm@champion")
    assert served.predict(pd.DataFrame({"prefix": ["The Time"], "num_chars": [5]}))[0] \
        .startswith("The Time")
    result = CliRunner().invoke(app, ["generate", "The Time", "--model", "lstm", "--num-chars",
                                      "5"])
    assert result.exit_code == 0 and result.output.startswith("The Time"), result.output
    result = CliRunner().invoke(app, ["generate", "Ωmega", "--model", "lstm"])
    assert result.exit_code != 0 and "lacks: 'Ω'" in result.output
