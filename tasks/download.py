"""download: fetch the corpus from the first source that delivers it, verified by checksum."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from prefect import Task
from prefect.client.schemas.objects import State, TaskRun
from prefect.tasks import exponential_backoff

from seqlm.download import AllSourcesFailed, ensure_file
from seqlm.params import Params
from seqlm.runtime.records import Record, stage_task

RETRY_BACKOFF_S = 1.0  # first retry after 1 s, then 2 s, 4 s, ...
log = logging.getLogger("seqlm.download")


@stage_task("download")
def download(params: Params) -> Record:
    """The corpus and its sha256 record (the stage's outs), from the first source that works."""
    ensure_file(params.download, log=log, check=usable_corpus(params))
    return {}


def usable_corpus(params: Params) -> Callable[[Path, str], None]:
    """What a fetched corpus must be before it replaces the last good one: the file preprocess
    accepts (text, UTF-8, letters) and long enough for the split. A source that changes
    (download.checksum: null) and serves an empty page one night keeps yesterday's corpus."""
    p = params.preprocess

    def check(fetched: Path, source: str) -> None:
        from seqlm.protocol import split_of
        from seqlm.text import corpus_length
        split_of(corpus_length(fetched, label=source, clean=p.clean), p.train_tokens,
                 p.val_tokens, p.test_tokens)
    return check


def retry_on_network_error(task: Task, task_run: TaskRun, state: State) -> bool:
    """Prefect retry condition: retry only when some source failed for a network reason.

    A 404, a checksum mismatch or a missing local file would fail the same way again.
    """
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, AllSourcesFailed) and exc.retriable


def configured_download(params: Params) -> Task:
    """The download task with Prefect retries (exponential backoff) on network errors only."""
    return download.with_options(
        retries=params.download.retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=RETRY_BACKOFF_S),
        retry_condition_fn=retry_on_network_error,
    )
