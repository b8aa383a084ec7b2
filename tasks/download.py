"""download: fetch the corpus from the first source that delivers it, verified by checksum."""
from __future__ import annotations

import logging
from pathlib import Path

from prefect import Task, get_run_logger, task
from prefect.client.schemas.objects import State, TaskRun
from prefect.exceptions import MissingContextError
from prefect.tasks import exponential_backoff

from seqlm.download import AllSourcesFailed, ensure_file
from seqlm.params import Params
from seqlm.stages import STAGE_BY_NAME

RETRY_BACKOFF_S = 1.0  # first retry after 1 s, then 2 s, 4 s, ...


@task(name="download")
def download(params: Params) -> list[Path]:
    outs = STAGE_BY_NAME["download"].paths(params)["outs"]  # the corpus and its sha256 record
    ensure_file(params.download, log=_logger())
    return [Path(out) for out in outs]


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


def _logger() -> logging.Logger | logging.LoggerAdapter:
    # The run logger sends the messages to the Prefect UI; `download.fn()` runs outside a run.
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("seqlm.download")
