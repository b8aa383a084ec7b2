"""ngrams: word and character n-gram counts as Parquet, a Zipf plot and the fitted exponents."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task

from seqlm.io import publish, write_json
from seqlm.ngrams import (NgramError, check_key_fits, count_ngrams, plot_zipf, write_parquet,
                          zipf_exponent)
from seqlm.params import Params
from seqlm.stages import CORPUS, NGRAMS, STAGE_BY_NAME, VOCAB
from seqlm.text import TOKENIZERS, Vocab

ZIPF_PLOT = f"{NGRAMS}/zipf.png"
ZIPF_MAX_N = 3                     # the seed plots unigrams, bigrams and trigrams


def table_path(level: str, n: int) -> Path:
    return Path(NGRAMS) / f"{level}_{n}.parquet"


@task(name="ngrams")
def ngrams(params: Params) -> list[Path]:
    p = params.ngrams
    metrics_path = Path(STAGE_BY_NAME["ngrams"].paths(params)["reports"][0])
    vocabs = {level: Vocab.load(_existing(VOCAB[level])) for level in TOKENIZERS}
    for level, vocab in vocabs.items():      # refuse before counting or writing anything
        try:
            check_key_fits(len(vocab), p.max_n)
        except NgramError as exc:
            raise NgramError(f"ngrams.max_n = {p.max_n}: {level} level: {exc}") from None

    written: list[Path] = []
    metrics: dict[str, float | int] = {}
    plotted: dict[str, dict[int, np.ndarray]] = {}
    # Each table is written as soon as it is counted (memory holds one level's tables at a
    # time) into a folder that replaces data/ngrams only when every output is written: a bad
    # corpus file or a full disk leaves the previous outputs, and tables of a larger max_n of
    # an earlier run go with the old folder.
    with publish() as outputs:
        folder = outputs.folder(NGRAMS)
        for level, vocab in vocabs.items():
            ids = _load_ids(CORPUS[level])
            try:
                counted = count_ngrams(ids, p.max_n, len(vocab), p.chunk_tokens)
            except NgramError as exc:
                raise NgramError(f"{CORPUS[level]}: {exc} ({VOCAB[level]})") from None
            plotted[level] = {}
            for n in sorted(counted):
                table = counted.pop(n).ranked()
                write_parquet(table, vocab.idx_to_token, folder / table_path(level, n).name)
                written.append(table_path(level, n))
                metrics[f"{level}_{n}_distinct"] = len(table)
                alpha = zipf_exponent(table.counts)
                if alpha is not None:        # absent when fewer than two n-grams occur twice
                    metrics[f"{level}_{n}_zipf_exponent"] = alpha
                if n <= ZIPF_MAX_N:
                    plotted[level][n] = table.counts
        plot_zipf(plotted, folder / Path(ZIPF_PLOT).name)
        write_json(outputs.file(metrics_path), metrics)
    return [*written, Path(ZIPF_PLOT), metrics_path]


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
