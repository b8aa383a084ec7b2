"""The seed's reference numbers (SPEC §1 preprocess) on the shipped corpus, asserted exactly."""
import numpy as np
import pytest

from seqlm.text import CorpusError, Vocab, read_lines, tokenize
from tasks.preprocess import preprocess
from seqlm.params import load_params
from seqlm import stages as S

from conftest import REPO, write_params

CORPUS = REPO / "data" / "mirror" / "timemachine.txt"


@pytest.fixture(scope="module")
def lines():
    return read_lines(CORPUS)


def test_lines_match_the_seed(lines):
    assert len(lines) == 3221
    assert lines[0] == "the time machine by h g wells"
    assert lines[10] == "twinkled and his usually pale face was flushed and animated the"


def test_word_vocabulary_matches_the_seed(lines):
    tokens = tokenize(lines, "word")
    vocab = Vocab(tokens)
    assert vocab.idx_to_token[:10] == ["<unk>", "the", "i", "and", "of", "a", "to", "was", "in", "that"]
    assert vocab[tokens[0]] == [1, 19, 50, 40, 2183, 2184, 400]
    assert vocab[tokens[10]] == [2186, 3, 25, 1044, 362, 113, 7, 1421, 3, 1045, 1]
    assert vocab.token_freqs[:3] == [("the", 2261), ("i", 1267), ("and", 1245)]
    assert vocab.to_tokens([1, 19, 50]) == ["the", "time", "machine"]
    assert vocab["no-such-word"] == vocab.unk == 0


def test_char_corpus_matches_the_seed(lines):
    tokens = tokenize(lines, "char")
    vocab = Vocab(tokens)
    assert sum(map(len, tokens)) == 170_580
    assert len(vocab) == 28
    assert vocab.to_tokens(0) == "<unk>"


def test_vocab_reserved_tokens_min_freq_and_roundtrip(tmp_path):
    vocab = Vocab([["b", "a", "b", "c", "a", "b", "d"]], min_freq=2, reserved_tokens=["<pad>", "<bos>"])
    assert vocab.idx_to_token == ["<unk>", "<pad>", "<bos>", "b", "a"]
    assert vocab[["c", "d", "a"]] == [0, 0, 4]
    loaded = Vocab.load(vocab.save(tmp_path / "v.parquet"))
    assert loaded.idx_to_token == vocab.idx_to_token
    assert loaded.freqs == [0, 0, 0, 3, 2]
    assert loaded.fingerprint() == vocab.fingerprint()
    # ties keep the order of first appearance, as the seed's Counter + stable sort
    assert Vocab([["z", "y", "x", "y", "z", "x"]]).idx_to_token == ["<unk>", "z", "y", "x"]


def test_unknown_tokenizer_is_an_error():
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe': expected one of word, char"):
        tokenize(["a b"], "bpe")


@pytest.mark.parametrize("content, message", [
    (b"", "corpus is empty"),
    (b"1234 !!! 5678\n--\n", "no letters"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary file"),
    (b"caf\xe9 au lait\n", "not UTF-8 (invalid byte at offset 3)"),
])
def test_unusable_corpus_is_refused(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        read_lines(path)
    assert str(path) in str(info.value)


def test_preprocess_stage_writes_its_declared_outputs(workdir):
    (workdir / "data" / "raw").mkdir()
    (workdir / "data" / "raw" / "timemachine.txt").write_bytes(CORPUS.read_bytes())
    record = preprocess.fn(load_params())
    written = sorted(str(p.relative_to(workdir)) for p in (workdir / S.PROCESSED).iterdir())
    assert written == sorted([S.LINES, *S.VOCAB.values(), *S.CORPUS.values()])
    [dataset] = record["datasets"]               # what the pipeline's MLflow run logs
    assert dataset["name"] == "timemachine" and dataset["source"] == "data/raw/timemachine.txt"
    ids = np.load(S.CORPUS["char"])
    assert ids.dtype == np.int32 and len(ids) == 170_580
    words = np.load(S.CORPUS["word"])
    vocab = Vocab.load(S.VOCAB["word"])
    assert vocab.to_tokens(words[:7].tolist()) == "the time machine by h g wells".split()
    assert (workdir / S.LINES).read_text().count("\n") == 3221


def test_preprocess_refuses_splits_beyond_the_corpus_and_writes_nothing(workdir):
    (workdir / "data" / "raw").mkdir()
    (workdir / "data" / "raw" / "timemachine.txt").write_bytes(CORPUS.read_bytes())
    write_params(workdir, preprocess={"train_tokens": 170_000, "val_tokens": 5_000})
    with pytest.raises(ValueError, match="^data/raw/timemachine.txt: preprocess.train_tokens \\+ "
                                         "preprocess.val_tokens = 170000 \\+ 5000 exceeds the "
                                         "corpus of 170580 tokens"):
        preprocess.fn(load_params())
    assert not (workdir / S.PROCESSED).exists()


def test_preprocess_refuses_a_corpus_of_only_non_letters(workdir):
    (workdir / "data" / "raw").mkdir()
    (workdir / "data" / "raw" / "timemachine.txt").write_text("1984 -- 2001 !!\n")
    with pytest.raises(CorpusError, match="no letters"):
        preprocess.fn(load_params())
    assert not (workdir / S.PROCESSED).exists()


def test_cli_stage_error_is_one_line(workdir):
    from typer.testing import CliRunner
    from seqlm.cli import app
    (workdir / "data" / "raw").mkdir()
    (workdir / "data" / "raw" / "timemachine.txt").write_bytes(b"")
    result = CliRunner().invoke(app, ["stage", "preprocess"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: CorpusError: data/raw/timemachine.txt: corpus is empty"
