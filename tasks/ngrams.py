"""ngrams: word and character n-gram counts as Parquet, a Zipf plot and the fitted exponents.

Counted in the stage's own task, chunk by chunk (`seqlm stage ngrams`, `dvc repro`), or, with
`ngrams.shard_tokens` set, as a map and a reduce that the flow fans out (on Dask, over the
workers): one `ngrams_shard` task per shard writes its partial counts, cut into
`ngrams.partitions` parts by n-gram, to a file under SHARDS; one `ngrams_reduce` task per
partition merges that part of every shard's counts and ranks it; the stage then merges the
ranked partitions as it writes the Parquet tables. No process ever holds all the distinct
n-grams, and both ways write the same bytes.
"""
from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, wait

from seqlm.io import publish, write_json
from seqlm.ngrams import (ZIPF_MIN_COUNT, CountRuns, NgramError, NgramTable, count_ngrams,
                          count_shard, load_partial, load_ranked, merge_ranked, partial_orders,
                          plot_zipf, reduce_partials, save_partial, save_ranked, shard_bounds,
                          split_partitions, write_parquet, zipf_exponent)
from seqlm.params import Params
from seqlm.runtime.records import Record, stage_task, up_to_date
from seqlm.stages import CORPUS, NGRAMS, STAGE_BY_NAME, VOCAB
from seqlm.text import TOKENIZERS
from seqlm.threads import beside_the_trainings, cores, release_freed_memory

ZIPF_PLOT = f"{NGRAMS}/zipf.png"
ZIPF_MAX_N = 3                     # the seed plots unigrams, bigrams and trigrams
SHARDS = Path(".seqlm/ngram-shards")  # the map's and reduce's files (git-ignored, shared tree)
Partitions = dict[str, list[str]]  # level -> the folders of its reduced partitions
MAX_SHARD_TASKS = 10_000           # per level: a task run each, in the Prefect server and UI
MERGE_ROWS = 1 << 20               # rows a merge of ranked partitions reads per round, in all
STAGE = STAGE_BY_NAME["ngrams"]
log = logging.getLogger("seqlm.ngrams")


def table_path(level: str, n: int) -> Path:
    return Path(NGRAMS) / f"{level}_{n}.parquet"


def shard_plan(params: Params) -> dict[str, list[tuple[int, int]]]:
    """level -> the [start, stop) token ranges of its shard tasks (the corpus files must exist).
    NgramError naming ngrams.shard_tokens when a level would need more than MAX_SHARD_TASKS."""
    shard_tokens = params.ngrams.shard_tokens
    plan = {level: shard_bounds(len(_load_ids(CORPUS[level])), shard_tokens)
            for level in TOKENIZERS}
    for level, bounds in plan.items():
        if len(bounds) > MAX_SHARD_TASKS:
            raise NgramError(
                f"ngrams.shard_tokens = {shard_tokens}: {len(bounds):,} shard tasks for the "
                f"{bounds[-1][1]:,} tokens of {CORPUS[level]} (at most {MAX_SHARD_TASKS:,}: "
                f"each is a Prefect task run); raise ngrams.shard_tokens")
    return plan


def partial_path(level: str, start: int, stop: int) -> str:
    return str(SHARDS / f"{level}-{start}-{stop}.npz")


def partition_path(level: str, partition: int) -> str:
    return str(SHARDS / f"{level}-partition-{partition}")


@task(name="ngrams_shard", cache_policy=NO_CACHE, persist_result=False)
def ngrams_shard(params: Params, level: str, start: int, stop: int) -> str:
    """Count the n-grams that start at tokens start..stop-1 of the `level` corpus (read from the
    file: the task reads its shard only) and write them, cut into partitions, to partial_path();
    returns that path."""
    vocab_size = _vocab_size(VOCAB[level])
    _load_ids(CORPUS[level])               # checked here; the shard reads its range only
    try:
        tables = count_shard(CORPUS[level], start, stop, params.ngrams.max_n, vocab_size)
        return str(save_partial(split_partitions(tables, params.ngrams.partitions),
                                partial_path(level, start, stop)))
    except NgramError as exc:
        raise NgramError(f"{CORPUS[level]}: {exc} ({VOCAB[level]})") from None
    finally:
        release_freed_memory()      # the next task on this process starts from its own arrays


@task(name="ngrams_reduce", cache_policy=NO_CACHE, persist_result=False)
def ngrams_reduce(level: str, partition: int, partials: list[str]) -> str:
    """Merge partition `partition` of the shards' `partials` (in any order) and write it ranked
    to partition_path(); returns that folder. One n at a time (a partial file is read an array
    at a time): memory is the partition's distinct n-grams of one order."""
    folder = partition_path(level, partition)
    try:
        for n in partial_orders(partials[0]) if partials else []:
            tables = reduce_partials(load_partial(path, partition, n) for path in partials)
            save_ranked({n: tables.pop(n).ranked()}, folder)
    finally:
        release_freed_memory()
    return folder


@stage_task("ngrams")
def ngrams(params: Params, partitions: Partitions | None = None) -> Record:
    """Count (or, given the reduce tasks' `partitions`, merge) and write the stage's outputs;
    returns the Zipf exponents and table sizes, and the tables for the pipeline's MLflow run."""
    beside_the_trainings(params)
    metrics_path = STAGE.at(params).reports.zipf
    vocabs = {level: _tokens(VOCAB[level]) for level in TOKENIZERS}

    metrics: dict[str, float | int] = {}
    plotted: dict[str, dict[int, CountRuns]] = {}
    # Each table is written as soon as it is counted (memory holds one level's tables at a
    # time) into a folder that replaces data/ngrams only when every output is written: a bad
    # corpus file or a full disk leaves the previous outputs, and tables of a larger max_n of
    # an earlier run go with the old folder. The tables are written side by side, one thread
    # each on the cores (pyarrow encodes and compresses without the GIL): writing Parquet, not
    # counting, takes most of the stage's time on large corpora.
    with publish() as outputs, ThreadPoolExecutor(cores()) as pool:
        folder = outputs.folder(NGRAMS)
        writes = []
        for level, tokens in vocabs.items():
            writes += [(level, n, pool.submit(_write_table, pieces, tokens,
                                              folder / table_path(level, n).name))
                       for n, pieces in _ranked_tables(level, len(tokens), params, partitions)]
            if partitions is None:            # counted here: one level's tables at a time
                for *_, write in writes:
                    write.result()
        # The fits once every table is written: a fit holds ~60 bytes per n-gram seen twice
        # (np.polyfit's arrays; 35 M character 5-grams of 1 GB of text), which on top of the
        # writers' row groups was the sharded stage's peak.
        written = [(level, n, *write.result()) for level, n, write in writes]
        for level, n, distinct, runs in written:
            metrics[f"{level}_{n}_distinct"] = distinct
            alpha = zipf_exponent(runs.counts(ZIPF_MIN_COUNT))
            if alpha is not None:            # absent when fewer than two n-grams occur twice
                metrics[f"{level}_{n}_zipf_exponent"] = alpha
            if n <= ZIPF_MAX_N:
                plotted.setdefault(level, {})[n] = runs
        plot_zipf(plotted, folder / Path(ZIPF_PLOT).name)
        write_json(outputs.file(metrics_path), metrics)
    if partitions is not None:
        shutil.rmtree(SHARDS, ignore_errors=True)      # merged and published: no longer needed
    release_freed_memory()                  # the trainings beside and after share this process
    return {"metrics": metrics, "artifacts": {"": [NGRAMS]}}


def submit_sharded(params: Params, upstream: list[PrefectFuture]) -> PrefectFuture:
    """The stage as a map and a reduce (ngrams.shard_tokens set): one `ngrams_shard` task per
    shard of each corpus and one `ngrams_reduce` task per partition, spread over the task
    runner's workers; the reduce futures are the `ngrams` task's `partitions`, so the UI draws
    the map, the reduce and the merge. The plan needs the corpus's size: it waits for
    `upstream` (preprocess). A stage that is up to date counts nothing: its task is Cached."""
    wait(upstream)
    if up_to_date(STAGE, params):
        return ngrams.submit(params, wait_for=upstream)
    shutil.rmtree(SHARDS, ignore_errors=True)         # files a killed run left behind
    plan, count = shard_plan(params), params.ngrams.partitions
    reduced = {}
    for level, bounds in plan.items():
        shards = [ngrams_shard.with_options(name=f"ngrams_shard[{level}:{start}]").submit(
                      params, level, start, stop, wait_for=upstream) for start, stop in bounds]
        reduced[level] = [ngrams_reduce.with_options(name=f"ngrams_reduce[{level}:{part}]").submit(
                              level, part, shards) for part in range(count)]
    log.info("ngrams: %s shard tasks of %d tokens, %d reduce tasks per level", " + ".join(
        f"{len(bounds)} {level}" for level, bounds in plan.items()), params.ngrams.shard_tokens,
        count)
    return ngrams.submit(params, partitions=reduced, wait_for=upstream)


def _ranked_tables(level: str, vocab_size: int, params: Params, partitions: Partitions | None
                   ) -> Iterator[tuple[int, Iterable[NgramTable]]]:
    """(n, its ranked table as consecutive pieces), n = 1..max_n: the reduced partitions merged
    as they are read, or the tables counted here (one level's at a time in memory)."""
    p = params.ngrams
    if partitions is not None:
        for n in range(1, p.max_n + 1):
            parts = [load_ranked(folder, n) for folder in partitions[level]]
            yield n, merge_ranked(parts, max(MERGE_ROWS // max(len(parts), 1), 1))
        return
    try:
        counted = count_ngrams(_load_ids(CORPUS[level]), p.max_n, vocab_size, p.chunk_tokens)
    except NgramError as exc:
        raise NgramError(f"{CORPUS[level]}: {exc} ({VOCAB[level]})") from None
    for n in sorted(counted):
        yield n, [counted.pop(n).ranked()]


def _write_table(pieces: Iterable[NgramTable], tokens: pa.Array, path: Path
                 ) -> tuple[int, CountRuns]:
    """A ranked table (in pieces) as Parquet: its number of rows, and its counts as runs (what
    the Zipf fit and plot need)."""
    runs = CountRuns()
    return write_parquet(_add_counts(pieces, runs), tokens, path), runs


def _add_counts(pieces: Iterable[NgramTable], runs: CountRuns) -> Iterator[NgramTable]:
    """The pieces, passing by; their counts go to `runs`."""
    for piece in pieces:
        runs.add(piece.counts)
        yield piece


def _existing(path: str) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: not found; run the preprocess stage first")
    return path


def _tokens(path: str) -> pa.Array:
    """A saved vocabulary's tokens by id (the token column Vocab.save writes), as an arrow
    array: the tables need no more, and a million words take megabytes where a Vocab, its list
    and its dict, take hundreds."""
    return pq.read_table(_existing(path), columns=["token"]).column("token") \
        .combine_chunks().cast(pa.string())


def _vocab_size(path: str) -> int:
    """The number of tokens of a saved vocabulary, from its Parquet footer: a shard task needs
    no more (loading a vocabulary of a million words takes seconds)."""
    return pq.ParquetFile(_existing(path)).metadata.num_rows


def _load_ids(path: str) -> np.ndarray:
    """The corpus as a read-only memory map: counting streams it chunk by chunk."""
    try:
        ids = np.load(_existing(path), mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise NgramError(f"{path}: not a readable .npy array ({exc})") from None
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise NgramError(f"{path}: expected a 1-D integer array, got shape {ids.shape} {ids.dtype}")
    return ids
