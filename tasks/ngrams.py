"""ngrams: word and character n-gram counts as Parquet, a Zipf plot and the fitted exponents.

Counted in the stage's own task, chunk by chunk (`seqlm stage ngrams`, `dvc repro`), or, with
`ngrams.shard_tokens` set, by one `ngrams_shard` task per shard that the flow fans out (on Dask,
over the workers), each writing its partial counts to a file under SHARDS; the stage then only
reduces them. Both ways write the same bytes.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from seqlm.io import publish, write_json
from seqlm.ngrams import (NgramError, NgramTable, check_key_fits, count_ngrams, count_shard,
                          load_partial, plot_zipf, reduce_partials, save_partial, shard_bounds,
                          write_parquet, zipf_exponent)
from seqlm.params import Params
from seqlm.stages import CORPUS, NGRAMS, STAGE_BY_NAME, VOCAB
from seqlm.text import TOKENIZERS, Vocab

ZIPF_PLOT = f"{NGRAMS}/zipf.png"
ZIPF_MAX_N = 3                     # the seed plots unigrams, bigrams and trigrams
SHARDS = Path(".seqlm/ngram-shards")  # partial counts of the shard tasks (git-ignored, shared tree)
Partials = dict[str, list[str]]    # level -> the partial files of its shards, in shard order


def table_path(level: str, n: int) -> Path:
    return Path(NGRAMS) / f"{level}_{n}.parquet"


def shard_plan(params: Params) -> dict[str, list[tuple[int, int]]]:
    """level -> the [start, stop) token ranges of its shard tasks (the corpus files must exist)."""
    return {level: shard_bounds(len(_load_ids(CORPUS[level])), params.ngrams.shard_tokens)
            for level in TOKENIZERS}


def partial_path(level: str, start: int, stop: int) -> str:
    return str(SHARDS / f"{level}-{start}-{stop}.npz")


@task(name="ngrams_shard", cache_policy=NO_CACHE)
def ngrams_shard(params: Params, level: str, start: int, stop: int) -> str:
    """Count the n-grams that start at tokens start..stop-1 of the `level` corpus (a memory map:
    the task reads its shard only) and write them to partial_path(); returns that path."""
    vocab_size = len(Vocab.load(_existing(VOCAB[level])))
    try:
        tables = count_shard(_load_ids(CORPUS[level]), start, stop, params.ngrams.max_n,
                             vocab_size)
    except NgramError as exc:
        raise NgramError(f"{CORPUS[level]}: {exc} ({VOCAB[level]})") from None
    return str(save_partial(tables, partial_path(level, start, stop)))


@task(name="ngrams")
def ngrams(params: Params, partials: Partials | None = None) -> list[Path]:
    """Count (or, given the shard tasks' `partials`, reduce) and write the stage's outputs."""
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
            counted = _count(level, vocab, params, partials)
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
    if partials is not None:
        shutil.rmtree(SHARDS, ignore_errors=True)      # reduced and published: no longer needed
    return [*written, Path(ZIPF_PLOT), metrics_path]


def _count(level: str, vocab: Vocab, params: Params,
           partials: Partials | None) -> dict[int, NgramTable]:
    p = params.ngrams
    if partials is not None:
        return reduce_partials(load_partial(path) for path in partials[level])
    try:
        return count_ngrams(_load_ids(CORPUS[level]), p.max_n, len(vocab), p.chunk_tokens)
    except NgramError as exc:
        raise NgramError(f"{CORPUS[level]}: {exc} ({VOCAB[level]})") from None


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
