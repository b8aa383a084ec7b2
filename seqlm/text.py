"""Text preprocessing of D2L 8.2: clean lines, tokenize, the frequency-ordered vocabulary, and the
streamed two-pass preprocess of a corpus of any size (count_tokens, then write_corpus).

Two cleanings (`preprocess.clean`): `letters`, the chapter's (lower-case letters and single
spaces, lines joined with no separator), and `none`, the text as it is (every character, newlines
included; a byte-order mark dropped, CRLF read as LF)."""
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
Clean = Literal["letters", "none"]
TOKENIZERS: tuple[str, ...] = ("word", "char")
UNK = "<unk>"


class CorpusError(ValueError):
    """The corpus file cannot be used (empty, binary, not UTF-8, no letters)."""


# Cleaning works on the raw UTF-8 bytes, a chunk at a time. Every byte of a non-ASCII character is
# >= 0x80 and no byte of one is a letter or a newline, so the runs of non-letter characters of the
# seed's rule are exactly the runs of non-letter bytes: the bytes rules below give the same lines.
CHUNK_BYTES = 1 << 22          # raw bytes read per streamed chunk: bounds preprocess memory
BOM = "\ufeff".encode()
# Character ids under `clean: none`: an alphabet of at most this many symbols keeps them uint16
# (2 bytes a character); `letters` keeps the chapter's int32 files as they were.
MAX_RAW_ALPHABET = 1 << 16
_LOWER_OR_SPACE = bytes(c + 32 if 65 <= c <= 90 else c if 97 <= c <= 122 or c == 10 else 32
                        for c in range(256))    # A-Z -> a-z, a-z and "\n" kept, the rest " "


def corpus_length(path: Path | str, label: str | None = None, clean: Clean = "letters") -> int:
    """The length of the character corpus of a text file (its cleaned lines joined; under `none`
    every character), after the checks preprocess makes (CorpusError naming `label`, else the
    path): what the download checks before a fetched file replaces the last good one."""
    if clean == "none":
        return sum(len(piece.decode("utf-8")) for piece in clean_chunks(path, label=label,
                                                                        clean=clean))
    return sum(len(piece) - piece.count(b"\n") for piece in clean_chunks(path, label=label))


def clean_chunks(path: Path | str, chunk_bytes: int = CHUNK_BYTES,
                 label: str | None = None, clean: Clean = "letters") -> Iterator[bytes]:
    """The cleaned text of a UTF-8 file, streamed as UTF-8 pieces of whole lines. Lines split at
    "\n", "\r\n" or "\r" as Python's universal newlines, and each ends with "\n". `letters` (seed
    read_time_machine): every run of characters outside [A-Za-z] becomes one space, then strip
    and lower-case. `none`: the text as it is, with LF line ends and without a leading
    byte-order mark (the last line ends as the file does). Memory is bounded by `chunk_bytes`
    plus the longest line.

    Refuses a file a language model cannot learn from, with the same priority as reading it
    whole: empty, then binary (a NUL byte anywhere), then not UTF-8, then nothing to learn
    (`letters`: no letter; `none`: only whitespace).
    """
    name = label or path
    path = Path(path)
    pending = b""              # the tail of the last chunk: an unfinished line
    offset = 0                 # position of `pending` in the file
    bad_utf8: int | None = None
    content = False            # a letter (letters) or a character that is not whitespace (none)
    empty = True
    with open(path, "rb") as handle:
        if clean == "none" and handle.read(len(BOM)) == BOM:
            offset = len(BOM)                  # a byte-order mark is no character of the text
        handle.seek(offset)
        eof = False
        while not eof:
            block = handle.read(chunk_bytes)
            eof = not block
            if eof and empty:
                raise CorpusError(f"{name}: corpus is empty")
            empty = False
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
                cleaned, has_content = _clean(piece) if clean == "letters" else _as_is(piece)
                content = content or has_content
                yield cleaned
    if bad_utf8 is not None:
        raise CorpusError(f"{name}: corpus is not UTF-8 (invalid byte at offset {bad_utf8})")
    if not content:
        raise CorpusError(f"{name}: corpus has no letters A-Z/a-z, nothing to tokenize"
                          if clean == "letters" else
                          f"{name}: corpus holds only whitespace, nothing to tokenize")


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


def _as_is(piece: bytes) -> tuple[bytes, bool]:
    """Whole lines of raw bytes, line ends read as LF; and whether any byte is not whitespace."""
    piece = piece.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return piece, bool(piece.strip())


def _shift(mask: np.ndarray, by: int) -> np.ndarray:
    """mask moved right (by > 0) or left (by < 0) by |by|, padded with False."""
    out = np.zeros_like(mask)
    if by > 0:
        out[by:] = mask[:-by]
    else:
        out[:by] = mask[-by:]
    return out


_NON_LETTERS = re.compile(r"[^A-Za-z]+")


def normalize_prefix(text: str, clean: Clean = "letters") -> str:
    """A prefix as preprocessing cleans the corpus. `letters`: lower-cased, every run of other
    characters one space ("Zebra!" -> "zebra "); not stripped: a trailing space is part of the
    prompt. `none`: as it is, line ends read as LF."""
    if clean == "none":
        return text.replace("\r\n", "\n").replace("\r", "\n")
    return _NON_LETTERS.sub(" ", text).lower()


def read_lines(path: Path | str, clean: Clean = "letters") -> list[str]:
    """Cleaned lines of a UTF-8 text file, in memory (small corpora, tests); see clean_chunks."""
    return b"".join(clean_chunks(path, clean=clean)).decode("utf-8").split("\n")[:-1]


def read_text(path: Path | str, clean: Clean = "letters") -> str:
    """The character corpus of a UTF-8 text file as one string, in memory (small corpora,
    tests): what corpus_char.npy holds, as characters."""
    text = b"".join(clean_chunks(path, clean=clean)).decode("utf-8")
    return text if clean == "none" else text.replace("\n", "")


def markdown_code(text: str, indent: str = "  ") -> str:
    """Generated text as Markdown code: inline where it is one line without backticks (the
    chapter's), else a fenced block indented under a list item (a raw text's lines)."""
    if "\n" not in text and "`" not in text:
        return f"`{text}`"
    body = "\n".join(indent + line for line in text.split("\n"))
    return f"\n\n{indent}~~~text\n{body}\n{indent}~~~"


def tokenize(lines: Iterable[str], token: str = "word") -> list[list[str]]:
    if token == "word":
        return [line.split() for line in lines]
    if token == "char":
        return [list(line) for line in lines]
    raise ValueError(f"unknown tokenizer {token!r}: expected one of {', '.join(TOKENIZERS)}")


def count_tokens(path: Path | str, chunk_bytes: int = CHUNK_BYTES, clean: Clean = "letters",
                 ) -> dict[str, dict[str, int]]:
    """First pass of the streamed preprocess: per tokenizer, each token's frequency, in order of
    first appearance (what Vocab needs for its ties). Memory: a chunk and the vocabularies."""
    words: collections.Counter = collections.Counter()
    bins = 256 if clean == "letters" else 0x110000           # bytes, or Unicode code points
    char_counts = np.zeros(bins, dtype=np.int64)
    char_first = np.zeros(bins, dtype=np.int64)
    position = 0
    for piece in clean_chunks(path, chunk_bytes, clean=clean):
        # Counters keep first-appearance order, across chunks. `letters` splits the bytes (ASCII
        # only); `none` splits the text at Unicode whitespace, as str.split() does.
        words.update(piece.split() if clean == "letters" else piece.decode("utf-8").split())
        chars = _chars(piece, clean)
        counts = np.bincount(chars, minlength=bins)
        new = np.flatnonzero((counts > 0) & (char_counts == 0))
        if len(new):                                         # the alphabet grows: where first
            uniques, first = np.unique(chars, return_index=True)
            char_first[new] = position + first[np.searchsorted(uniques, new)]
        char_counts += counts
        position += len(chars)
    seen = sorted(np.flatnonzero(char_counts), key=lambda c: char_first[c])
    word_freqs = {(w.decode("ascii") if isinstance(w, bytes) else w): n for w, n in words.items()}
    return {"word": word_freqs, "char": {chr(c): int(char_counts[c]) for c in seen}}


def _chars(piece: bytes, clean: Clean = "letters") -> np.ndarray:
    """The character tokens of cleaned text as integers: under `letters` the bytes of all lines
    concatenated with no separator; under `none` the code points of every character."""
    if clean == "none":
        return np.frombuffer(piece.decode("utf-8").encode("utf-32-le"), dtype=np.uint32)
    chars = np.frombuffer(piece, dtype=np.uint8)
    return chars[chars != 10]


def char_dtype(clean: Clean, vocab_size: int, label: str = "corpus") -> np.dtype:
    """The integer type of the character ids: the chapter's int32 under `letters`; uint16 under
    `none` (2 bytes a character), which holds an alphabet of up to 65,536 symbols."""
    if clean == "letters":
        return np.dtype(np.int32)
    if vocab_size > MAX_RAW_ALPHABET:
        raise CorpusError(f"{label}: its {vocab_size:,} distinct characters do not fit the uint16 "
                          f"character ids (at most {MAX_RAW_ALPHABET:,}); raise "
                          "preprocess.min_freq to map the rarest to <unk>")
    return np.dtype(np.uint16)


def write_corpus(path: Path | str, vocabs: Mapping[str, "Vocab"], lines_path: Path | str,
                 ids_paths: Mapping[str, Path | str], chunk_bytes: int = CHUNK_BYTES,
                 clean: Clean = "letters") -> None:
    """Second pass of the streamed preprocess: the cleaned text to `lines_path` (under `letters`
    one cleaned line per line) and, per tokenizer, the ids of all its tokens (under `letters`
    those of all lines concatenated with no separator, seed load_corpus_time_machine) to a .npy,
    byte-identical to np.save: int32, and uint16 for the characters under `none` (char_dtype).
    `vocabs` come from count_tokens of the same file. The files appear together, atomically, when
    all are written."""
    as_text = clean == "none"
    word_ids = {(tok if as_text else tok.encode("ascii")): vocabs["word"][tok]
                for tok, _ in vocabs["word"].token_freqs}
    dtypes = {"word": np.dtype(np.int32), "char": char_dtype(clean, len(vocabs["char"]), str(path))}
    if as_text:           # code point -> id, for the code points of the text
        codes = np.array(sorted(ord(t) for t, _ in vocabs["char"].token_freqs), dtype=np.uint32)
        code_ids = np.array([vocabs["char"][chr(c)] for c in codes], dtype=dtypes["char"])
    else:
        char_ids = np.array([vocabs["char"][chr(c)] for c in range(256)], dtype=np.int32)
    lengths = {level: sum(f for _, f in vocab.token_freqs) for level, vocab in vocabs.items()}
    written = dict.fromkeys(lengths, 0)
    with contextlib.ExitStack() as stack:
        lines = stack.enter_context(atomic_open(lines_path, "wb"))
        npy = {level: stack.enter_context(atomic_open(ids_paths[level], "wb")) for level in lengths}
        for level, handle in npy.items():    # the header np.save writes: its length is known
            npy_format.write_array_header_1_0(handle, {
                "descr": npy_format.dtype_to_descr(dtypes[level]), "fortran_order": False,
                "shape": (lengths[level],)})
        for piece in clean_chunks(path, chunk_bytes, clean=clean):
            lines.write(piece)
            words = piece.decode("utf-8").split() if as_text else piece.split()
            chars = _chars(piece, clean)
            ids = {"word": np.fromiter(map(word_ids.get, words, repeat(0)), np.int32, len(words)),
                   "char": code_ids[np.searchsorted(codes, chars)] if as_text else
                   char_ids[chars]}
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
