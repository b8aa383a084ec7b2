"""The streamed preprocess (two passes, chunk by chunk) writes exactly what reading the whole
corpus into memory writes: same lines, vocabularies, ids and errors, byte for byte."""
from __future__ import annotations

import collections
import io
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqlm.text import CorpusError, Vocab, clean_chunks, count_tokens, read_lines, write_corpus

from conftest import REPO

SHIPPED = REPO / "data" / "mirror" / "timemachine.txt"


def in_memory(data: bytes, min_freq: int = 0, reserved: tuple[str, ...] = ()) -> dict[str, bytes]:
    """The reference: the seed's read_time_machine on the whole text (str regex per line), its
    tokenize and Vocab, and np.save of the ids; the checks in the order the stage makes them."""
    if not data:
        raise CorpusError("corpus is empty")
    if b"\x00" in data:
        raise CorpusError("corpus is a binary file (contains NUL bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"corpus is not UTF-8 (invalid byte at offset {exc.start})") from None
    raw = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if raw[-1] == "":
        raw.pop()
    lines = [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in raw]
    if not any(lines):
        raise CorpusError("corpus has no letters A-Z/a-z, nothing to tokenize")
    out = {"lines.txt": ("\n".join(lines) + "\n").encode()}
    for level in ("word", "char"):
        tokens = [line.split() if level == "word" else list(line) for line in lines]
        vocab = Vocab(tokens, min_freq=min_freq, reserved_tokens=reserved)
        buffer = io.BytesIO()
        np.save(buffer, np.asarray([vocab[t] for line in tokens for t in line], dtype=np.int32))
        out[f"corpus_{level}.npy"] = buffer.getvalue()
        out[f"vocab_{level}"] = vocab.idx_to_token, vocab.freqs, vocab.token_freqs
    return out


def streamed(path: Path, out: Path, chunk_bytes: int, min_freq: int = 0,
             reserved: tuple[str, ...] = ()) -> dict[str, bytes]:
    """What tasks/preprocess.py does, with a chosen chunk size."""
    freqs = count_tokens(path, chunk_bytes)
    vocabs = {level: Vocab(freqs[level], min_freq=min_freq, reserved_tokens=reserved)
              for level in ("word", "char")}
    write_corpus(path, vocabs, out / "lines.txt", {lv: out / f"corpus_{lv}.npy" for lv in vocabs},
                 chunk_bytes)
    files = {name: (out / name).read_bytes()
             for name in ("lines.txt", "corpus_word.npy", "corpus_char.npy")}
    for level, vocab in vocabs.items():
        files[f"vocab_{level}"] = vocab.idx_to_token, vocab.freqs, vocab.token_freqs
    return files


# Letters, separators, line breaks of every kind (and characters that are *not* line breaks for
# the seed: \v, \f, \x1c, \x85, \u2028), digits, punctuation, non-ASCII letters and symbols.
ALPHABET = "abcXYZ" + " \t" + "\r\n\r\n" + "\v\f\x1c\x85\u2028" + "09.,;'-" + "éßΩ日😀"


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(ALPHABET, max_size=200), chunk_bytes=st.integers(1, 40),
       min_freq=st.integers(0, 3), reserved=st.sampled_from([(), ("<pad>",), ("a", "<bos>")]))
def test_streamed_equals_in_memory_on_random_text(tmp_path: Path, text: str, chunk_bytes: int,
                                                  min_freq: int, reserved: tuple) -> None:
    data = text.encode("utf-8")
    path = tmp_path / "corpus.txt"
    path.write_bytes(data)
    try:
        expected = in_memory(data, min_freq, reserved)
    except CorpusError as exc:
        with pytest.raises(CorpusError) as info:
            streamed(path, tmp_path / "out", chunk_bytes, min_freq, reserved)
        assert str(info.value) == f"{path}: {exc}"
        return
    assert streamed(path, tmp_path / "out", chunk_bytes, min_freq, reserved) == expected
    assert read_lines(path) == expected["lines.txt"].decode().split("\n")[:-1]


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.lists(st.sampled_from([b"ab", b"C\n", b"\r", b" ", b"\x00", b"\xff", b"\xc3",
                                      b"\xc3\xa9", b"\xe6\x97\xa5", b"\n", b"9"]),
                     max_size=30).map(b"".join),
       chunk_bytes=st.integers(1, 12))
def test_streamed_refuses_what_in_memory_refuses(tmp_path: Path, data: bytes,
                                                 chunk_bytes: int) -> None:
    """Bytes that may be binary, broken UTF-8 (a character cut by a chunk border or a line
    break), or letter-less: the same error, naming the first bad byte, or the same output."""
    path = tmp_path / "corpus.txt"
    path.write_bytes(data)
    try:
        expected = in_memory(data)
    except CorpusError as exc:
        with pytest.raises(CorpusError) as info:
            list(clean_chunks(path, chunk_bytes))
        assert str(info.value) == f"{path}: {exc}"
        return
    assert streamed(path, tmp_path / "out", chunk_bytes) == expected


@pytest.mark.parametrize("chunk_bytes", [1 << 22, 4096, 1000])
def test_streamed_equals_in_memory_on_the_shipped_corpus(tmp_path: Path, chunk_bytes: int) -> None:
    assert streamed(SHIPPED, tmp_path, chunk_bytes) == in_memory(SHIPPED.read_bytes())


def test_count_tokens_orders_ties_by_first_appearance(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"Zebra, yak!\r\nxi yak\n\nzebra xi\r")
    freqs = count_tokens(path, chunk_bytes=3)
    assert list(freqs["word"].items()) == [("zebra", 2), ("yak", 2), ("xi", 2)]
    assert freqs["char"] == dict(collections.Counter("zebra yakxi yakzebra xi"))
    assert list(freqs["char"]) == list(dict.fromkeys("zebra yakxi yakzebra xi"))
    assert Vocab(freqs["word"]).idx_to_token == ["<unk>", "zebra", "yak", "xi"]


def test_a_failed_second_pass_leaves_no_output(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"one two\nthree\n")
    vocabs = {level: Vocab(freqs) for level, freqs in count_tokens(path).items()}
    path.write_bytes(b"one two\nthree four\n")            # changed between the passes
    out = tmp_path / "out"
    with pytest.raises(CorpusError, match="changed while it was being read"):
        write_corpus(path, vocabs, out / "lines.txt", {lv: out / f"{lv}.npy" for lv in vocabs})
    assert not any(p.is_file() for p in out.rglob("*"))
