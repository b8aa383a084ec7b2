"""Text preprocessing of D2L 8.2: clean lines, tokenize, and the frequency-ordered vocabulary."""
from __future__ import annotations

import collections
import hashlib
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, overload

import pandas as pd

from seqlm.io import atomic_path

Tokenizer = Literal["word", "char"]
TOKENIZERS: tuple[str, ...] = ("word", "char")
UNK = "<unk>"
_NON_LETTERS = re.compile(r"[^A-Za-z]+")


class CorpusError(ValueError):
    """The corpus file cannot be used (empty, binary, not UTF-8, no letters)."""


def clean_line(line: str) -> str:
    """Every run of non-letters becomes one space; then strip and lower-case (seed read_time_machine)."""
    return _NON_LETTERS.sub(" ", line).strip().lower()


def read_lines(path: Path | str) -> list[str]:
    """Cleaned lines of a UTF-8 text file; refuses files a language model cannot learn from."""
    path = Path(path)
    data = path.read_bytes()
    if not data:
        raise CorpusError(f"{path}: corpus is empty")
    if b"\x00" in data:
        raise CorpusError(f"{path}: corpus is a binary file (contains NUL bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path}: corpus is not UTF-8 (invalid byte at offset {exc.start})") from None
    # The seed's readlines() in text mode: universal newlines, no empty line after the last "\n".
    raw_lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if raw_lines[-1] == "":
        raw_lines.pop()
    lines = [clean_line(line) for line in raw_lines]
    if not any(lines):
        raise CorpusError(f"{path}: corpus has no letters A-Z/a-z, nothing to tokenize")
    return lines


def tokenize(lines: Iterable[str], token: str = "word") -> list[list[str]]:
    if token == "word":
        return [line.split() for line in lines]
    if token == "char":
        return [list(line) for line in lines]
    raise ValueError(f"unknown tokenizer {token!r}: expected one of {', '.join(TOKENIZERS)}")


class Vocab:
    """Index 0 is <unk>, then reserved tokens, then tokens by descending frequency (ties by first
    appearance); tokens rarer than min_freq are dropped and map to <unk>."""

    def __init__(self, tokens: Iterable = (), min_freq: int = 0,
                 reserved_tokens: Sequence[str] = ()) -> None:
        counter = collections.Counter(_flatten(tokens))
        # sorted() is stable and Counter keeps first-appearance order: ties stay in that order.
        self._token_freqs = sorted(counter.items(), key=lambda kv: kv[1], reverse=True)
        self.idx_to_token: list = [UNK, *reserved_tokens]
        self.freqs: list[int] = [0] * len(self.idx_to_token)
        self.token_to_idx = {tok: i for i, tok in enumerate(self.idx_to_token)}
        for token, freq in self._token_freqs:
            if freq < min_freq:
                break
            if token not in self.token_to_idx:
                self.token_to_idx[token] = len(self.idx_to_token)
                self.idx_to_token.append(token)
                self.freqs.append(freq)

    def __len__(self) -> int:
        return len(self.idx_to_token)

    @overload
    def __getitem__(self, tokens: str) -> int: ...
    @overload
    def __getitem__(self, tokens: list | tuple) -> list: ...
    def __getitem__(self, tokens):
        if isinstance(tokens, (list, tuple)):
            return [self[t] for t in tokens]
        return self.token_to_idx.get(tokens, self.unk)

    @overload
    def to_tokens(self, indices: int) -> str: ...
    @overload
    def to_tokens(self, indices: list | tuple) -> list: ...
    def to_tokens(self, indices):
        if isinstance(indices, (list, tuple)):
            return [self.idx_to_token[i] for i in indices]
        return self.idx_to_token[indices]

    @property
    def unk(self) -> int:
        return 0

    @property
    def token_freqs(self) -> list[tuple[str, int]]:
        """All counted tokens by descending frequency, as in the seed (min_freq not applied)."""
        return self._token_freqs

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({
            "index": pd.Series(range(len(self)), dtype="int32"),
            "token": pd.Series(self.idx_to_token, dtype="string"),
            "freq": pd.Series(self.freqs, dtype="int64"),
        })

    def save(self, path: Path | str) -> Path:
        with atomic_path(path) as tmp:
            self.to_frame().to_parquet(tmp, index=False, compression="zstd")
        return Path(path)

    @classmethod
    def load(cls, path: Path | str) -> "Vocab":
        frame = pd.read_parquet(path)
        vocab = cls()
        vocab.idx_to_token = frame["token"].astype(str).tolist()
        vocab.freqs = frame["freq"].astype(int).tolist()
        vocab.token_to_idx = {tok: i for i, tok in enumerate(vocab.idx_to_token)}
        vocab._token_freqs = [(t, f) for t, f in zip(vocab.idx_to_token, vocab.freqs) if f > 0]
        return vocab

    def fingerprint(self) -> str:
        """Identifies the vocabulary; a checkpoint trained on another one is refused."""
        return hashlib.sha256("\x1f".join(self.idx_to_token).encode()).hexdigest()[:16]


def _flatten(tokens: Iterable) -> Iterable:
    tokens = list(tokens)
    if tokens and isinstance(tokens[0], list):
        return [tok for line in tokens for tok in line]
    return tokens
