"""Where the stages run: threads of the flow's process, or a Dask cluster (Prefect's own
integration, prefect-dask). Prefect schedules the tasks on either; this only builds the runner
`execution` asks for."""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from seqlm.params import ModelName, Params
from seqlm.threads import cores
from seqlm.stages import STAGES

# A thread for every stage task of a run, so that a short stage never waits for a training to
# free one (trainings take their slots from a concurrency limit instead), and as many more as
# the machine has cores for the n-gram shard tasks: hundreds of them must not count, and hold
# their memory, all at once.
LOCAL_THREADS = len(STAGES) + len(ModelName.__args__) + cores()


def local_runner() -> ThreadPoolTaskRunner:
    return ThreadPoolTaskRunner(max_workers=LOCAL_THREADS)


def task_runner_for(params: Params) -> TaskRunner:
    """The Prefect task runner `execution` asks for."""
    ex = params.execution
    if ex.task_runner == "local":
        return local_runner()
    from prefect_dask import DaskTaskRunner
    # distributed narrates every connection, worker and shutdown step at INFO (~30 lines a run);
    # its warnings and errors still show.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if ex.dask_address:
        return DaskTaskRunner(address=ex.dask_address)
    import torch
    gpus = torch.cuda.device_count()
    # One worker per GPU, or per core on a CPU machine, each with one `GPU` slot for trainings.
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": gpus or os.cpu_count() or 1, "threads_per_worker": 1,
        "processes": True, "resources": {"GPU": 1}, "dashboard_address": None})


@contextlib.contextmanager
def one_gpu_each(dask: bool) -> Iterator[None]:
    """On Dask, tasks submitted meanwhile ask for one `GPU` resource: one training per GPU (or
    per worker on a CPU cluster)."""
    if not dask:
        yield
        return
    import dask as dask_
    with dask_.annotate(resources={"GPU": 1}):
        yield
