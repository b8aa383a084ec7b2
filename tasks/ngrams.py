"""ngrams: word and character n-gram counts as Parquet, a Zipf plot and the fitted exponents."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from prefect import task

from seqlm.io import atomic_path, write_json
from seqlm.ngrams import (NgramError, NgramTable, check_key_fits, count_ngrams, plot_zipf,
                          to_arrow, zipf_exponent)
from seqlm.params import Params
from seqlm.stages import CORPUS, NGRAMS, STAGE_BY_NAME, VOCAB
from seqlm.text import TOKENIZERS, Vocab

ZIPF_PLOT = f"{NGRAMS}/zipf.png"
ZIPF_MAX_N = 3                     # the seed plots unigrams, bigrams and trigrams
_TABLE_FILE = re.compile(r"(word|char)_\d+\.parquet")


def table_path(level: str, n: int) -> Path:
    return Path(NGRAMS) / f"{level}_{n}.parquet"


@task(name="ngrams")
def ngrams(params: Params) -> list[Path]:
    p = params.ngrams
    metrics_path = Path(STAGE_BY_NAME["ngrams"].paths(params)["metrics"][0])
    vocabs = {level: Vocab.load(_existing(VOCAB[level])) for level in TOKENIZERS}
    for level, vocab in vocabs.items():      # refuse before counting or writing anything
        try:
            check_key_fits(len(vocab), p.max_n)
        except NgramError as exc:
            raise NgramError(f"ngrams.max_n = {p.max_n}: {level} level: {exc}") from None

    # Count everything first so that a bad corpus file leaves the previous outputs untouched.
    tables: dict[str, dict[int, NgramTable]] = {}
    for level, vocab in vocabs.items():
        ids = _load_ids(CORPUS[level])
        try:
            counted = count_ngrams(ids, p.max_n, len(vocab), p.chunk_tokens)
        except NgramError as exc:
            raise NgramError(f"{CORPUS[level]}: {exc} ({VOCAB[level]})") from None
        tables[level] = {n: table.ranked() for n, table in counted.items()}

    written: list[Path] = []
    metrics: dict[str, float | int] = {}
    for level, by_n in tables.items():
        for n, table in by_n.items():
            with atomic_path(table_path(level, n)) as tmp:
                pq.write_table(to_arrow(table, vocabs[level].idx_to_token), tmp, compression="zstd")
            written.append(table_path(level, n))
            metrics[f"{level}_{n}_distinct"] = len(table)
            alpha = zipf_exponent(table.counts)
            if alpha is not None:            # absent when fewer than two n-grams occur twice
                metrics[f"{level}_{n}_zipf_exponent"] = alpha
    # A smaller max_n than last run: older tables are no longer outputs of this stage.
    for stale in Path(NGRAMS).iterdir():
        if _TABLE_FILE.fullmatch(stale.name) and stale not in written:
            stale.unlink()

    plotted = {level: {n: t.counts for n, t in by_n.items() if n <= ZIPF_MAX_N}
               for level, by_n in tables.items()}
    written.append(plot_zipf(plotted, ZIPF_PLOT))
    written.append(write_json(metrics_path, metrics))
    return written


def _existing(path: str) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: not found; run the preprocess stage first")
    return path


def _load_ids(path: str) -> np.ndarray:
    """The corpus as a read-only memory map: counting streams it chunk by chunk."""
    try:
        ids = np.load(_existing(path), mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise NgramError(f"{path}: not a readable .npy array ({exc})") from None
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise NgramError(f"{path}: expected a 1-D integer array, got shape {ids.shape} {ids.dtype}")
    return ids
