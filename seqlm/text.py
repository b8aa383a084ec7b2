"""Text preprocessing of D2L 8.2: clean lines, tokenize, the frequency-ordered vocabulary, and the
streamed two-pass preprocess of a corpus of any size (count_tokens, then write_corpus)."""
from __future__ import annotations

import collections
import contextlib
import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Literal, overload

import numpy as np
from numpy.lib import format as npy_format

from seqlm.io import atomic_open, atomic_path

if TYPE_CHECKING:                  # pandas loads where a vocabulary is saved or loaded
    import pandas as pd

Tokenizer = Literal["word", "char"]
TOKENIZERS: tuple[str, ...] = ("word", "char")
UNK = "<unk>"


class CorpusError(ValueError):
    """The corpus file cannot be used (empty, binary, not UTF-8, no letters)."""


# Cleaning works on the raw UTF-8 bytes, a chunk at a time. Every byte of a non-ASCII character is
# >= 0x80 and no byte of one is a letter or a newline, so the runs of non-letter characters of the
# seed's rule are exactly the runs of non-letter bytes: the bytes rules below give the same lines.
CHUNK_BYTES = 1 << 22          # raw bytes read per streamed chunk: bounds preprocess memory
_LOWER_OR_SPACE = bytes(c + 32 if 65 <= c <= 90 else c if 97 <= c <= 122 or c == 10 else 32
                        for c in range(256))    # A-Z -> a-z, a-z and "\n" kept, the rest " "


def corpus_length(path: Path | str, label: str | None = None) -> int:
    """The length of the character corpus of a text file (its cleaned lines joined), after the
    checks preprocess makes (CorpusError naming `label`, else the path): what the download
    checks before a fetched file replaces the last good one."""
    return sum(len(piece) - piece.count(b"\n") for piece in clean_chunks(path, label=label))


def clean_chunks(path: Path | str, chunk_bytes: int = CHUNK_BYTES,
                 label: str | None = None) -> Iterator[bytes]:
    """The cleaned lines of a UTF-8 text file, streamed as pieces of whole lines, each line ending
    with b"\n" (seed read_time_machine: every run of characters outside [A-Za-z] becomes one space,
    then strip and lower-case; lines split at "\n", "\r\n" or "\r" as Python's universal
    newlines). Memory is bounded by `chunk_bytes` plus the longest line.

    Refuses a file a language model cannot learn from, with the same priority as reading it
    whole: empty, then binary (a NUL byte anywhere), then not UTF-8, then no letters.
    """
    name = label or path
    path = Path(path)
    pending = b""              # the tail of the last chunk: an unfinished line
    offset = 0                 # position of `pending` in the file
    bad_utf8: int | None = None
    letters = False
    with open(path, "rb") as handle:
        eof = False
        while not eof:
            block = handle.read(chunk_bytes)
            eof = not block
            if eof and handle.tell() == 0:
                raise CorpusError(f"{name}: corpus is empty")
            if b"\x00" in block:
                raise CorpusError(f"{name}: corpus is a binary file (contains NUL bytes)")
            if bad_utf8 is not None:       # read on only to tell a binary file apart
                continue
            data = pending + block
            # Cut after the last line break; a final "\r" waits, it may start a "\r\n". A break is
            # ASCII, so the cut never splits a UTF-8 character and each piece decodes on its own.
            cut = len(data) if eof else \
                max(data.rfind(b"\n"), data.rfind(b"\r", 0, len(data) - 1)) + 1
            piece, pending = data[:cut], data[cut:]
            try:
                piece.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad_utf8 = offset + exc.start
                continue
            offset += cut
            if piece:
                cleaned, has_letters = _clean(piece)
                letters = letters or has_letters
                yield cleaned
    if bad_utf8 is not None:
        raise CorpusError(f"{name}: corpus is not UTF-8 (invalid byte at offset {bad_utf8})")
    if not letters:
        raise CorpusError(f"{name}: corpus has no letters A-Z/a-z, nothing to tokenize")


def _clean(piece: bytes) -> tuple[bytes, bool]:
    """Whole lines of raw bytes -> the cleaned lines, each ending in b"\n"; and whether any has a
    letter."""
    piece = piece.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if not piece.endswith(b"\n"):     # the file's last line
        piece += b"\n"
    a = np.frombuffer(piece.translate(_LOWER_OR_SPACE), dtype=np.uint8)
    letter, space = a > 32, a == 32
    after_letter, before_letter = _shift(letter, 1), _shift(letter, -1)
    # A space survives only between two letters: this strips the lines and, with the runs below,
    # collapses each run to its first space. Vectorised: a regex per line costs several times more.
    keep = ~space | (after_letter & before_letter)
    after_space, before_space = _shift(space, 1), _shift(space, -1)
    run_starts = np.flatnonzero(space & ~after_space & before_space)    # runs of 2+ spaces
    run_ends = np.flatnonzero(space & after_space & ~before_space)
    keep[run_starts[after_letter[run_starts] & before_letter[run_ends]]] = True
    return a[keep].tobytes(), bool(letter.any())


def _shift(mask: np.ndarray, by: int) -> np.ndarray:
    """mask moved right (by > 0) or left (by < 0) by |by|, padded with False."""
    out = np.zeros_like(mask)
    if by > 0:
        out[by:] = mask[:-by]
    else:
        out[:by] = mask[-by:]
    return out


_NON_LETTERS = re.compile(r"[^A-Za-z]+")


def normalize_prefix(text: str) -> str:
    """A prefix as preprocessing cleans the corpus: lower-cased, every run of other characters
    one space ("Zebra!" -> "zebra "). Not stripped: a trailing space is part of the prompt."""
    return _NON_LETTERS.sub(" ", text).lower()


def read_lines(path: Path | str) -> list[str]:
    """Cleaned lines of a UTF-8 text file, in memory (small corpora, tests); see clean_chunks."""
    return b"".join(clean_chunks(path)).decode("ascii").split("\n")[:-1]


def tokenize(lines: Iterable[str], token: str = "word") -> list[list[str]]:
    if token == "word":
        return [line.split() for line in lines]
    if token == "char":
        return [list(line) for line in lines]
    raise ValueError(f"unknown tokenizer {token!r}: expected one of {', '.join(TOKENIZERS)}")


def count_tokens(path: Path | str, chunk_bytes: int = CHUNK_BYTES) -> dict[str, dict[str, int]]:
    """First pass of the streamed preprocess: per tokenizer, each token's frequency, in order of
    first appearance (what Vocab needs for its ties). Memory: a chunk and the vocabularies."""
    words: collections.Counter[bytes] = collections.Counter()
    char_counts = np.zeros(256, dtype=np.int64)
    char_first = np.zeros(256, dtype=np.int64)
    position = 0
    for piece in clean_chunks(path, chunk_bytes):
        words.update(piece.split())      # a Counter keeps first-appearance order, across chunks
        chars = _chars(piece)
        counts = np.bincount(chars, minlength=256)
        for c in np.flatnonzero((counts > 0) & (char_counts == 0)):   # at most 27 in all
            char_first[c] = position + int(np.argmax(chars == c))
        char_counts += counts
        position += len(chars)
    seen = sorted(np.flatnonzero(char_counts), key=lambda c: char_first[c])
    return {"word": {w.decode("ascii"): n for w, n in words.items()},
            "char": {chr(c): int(char_counts[c]) for c in seen}}


def _chars(piece: bytes) -> np.ndarray:
    """The character tokens of cleaned lines: all lines concatenated with no separator."""
    chars = np.frombuffer(piece, dtype=np.uint8)
    return chars[chars != 10]


def write_corpus(path: Path | str, vocabs: Mapping[str, "Vocab"], lines_path: Path | str,
                 ids_paths: Mapping[str, Path | str], chunk_bytes: int = CHUNK_BYTES) -> None:
    """Second pass of the streamed preprocess: the cleaned lines (one per line) to `lines_path`
    and, per tokenizer, the ids of all tokens of all lines concatenated with no separator (seed
    load_corpus_time_machine) to an int32 .npy, byte-identical to np.save. `vocabs` come from
    count_tokens of the same file. The files appear together, atomically, when all are written."""
    word_ids = {tok.encode("ascii"): vocabs["word"][tok] for tok, _ in vocabs["word"].token_freqs}
    char_ids = np.array([vocabs["char"][chr(c)] for c in range(256)], dtype=np.int32)
    lengths = {level: sum(f for _, f in vocab.token_freqs) for level, vocab in vocabs.items()}
    written = dict.fromkeys(lengths, 0)
    with contextlib.ExitStack() as stack:
        lines = stack.enter_context(atomic_open(lines_path, "wb"))
        npy = {level: stack.enter_context(atomic_open(ids_paths[level], "wb")) for level in lengths}
        for level, handle in npy.items():    # the header np.save writes: its length is known
            npy_format.write_array_header_1_0(handle, {
                "descr": npy_format.dtype_to_descr(np.dtype(np.int32)), "fortran_order": False,
                "shape": (lengths[level],)})
        for piece in clean_chunks(path, chunk_bytes):
            lines.write(piece)
            words = piece.split()
            ids = {"word": np.fromiter(map(word_ids.get, words, repeat(0)), np.int32, len(words)),
                   "char": char_ids[_chars(piece)]}
            for level, handle in npy.items():
                handle.write(ids[level].tobytes())
                written[level] += len(ids[level])
        if written != lengths:
            raise CorpusError(f"{path}: the file changed while it was being read")


class Vocab:
    """Index 0 is <unk>, then reserved tokens, then tokens by descending frequency (ties by first
    appearance); tokens rarer than min_freq are dropped and map to <unk>.

    `tokens` is a list of tokens, a list of token lists, or already counted: a mapping token ->
    frequency in order of first appearance (count_tokens of a streamed corpus)."""

    def __init__(self, tokens: Iterable | Mapping[str, int] = (), min_freq: int = 0,
                 reserved_tokens: Sequence[str] = ()) -> None:
        counter = tokens if isinstance(tokens, Mapping) else collections.Counter(_flatten(tokens))
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
        import pandas as pd
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
        import pandas as pd
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
