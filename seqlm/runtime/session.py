"""What a pipeline run holds while its stages run, taken and given back in one place, whatever
started the flow (`seqlm run`, `seqlm schedule`, a Prefect worker): the workspace, the signal
handlers, the checks of the machine and the MLflow store, the clean-up after a killed run, the
run's training slots and its MLflow parent run.

A run a deployment started (a worker's, `seqlm schedule`'s) that finds the workspace busy (a
`seqlm run`, a `dvc repro`, a run of another deployment) waits for it, within its time bound,
instead of failing: a scheduled run is never turned into a failure by another run."""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectNotFound

from seqlm import tracking
from seqlm.params import Params
from seqlm import interrupt
from seqlm.runtime import server
from seqlm.runtime.deadline import Deadline
from seqlm.runtime.news import RunNews
from seqlm.runtime.preflight import check_dvc_lock, check_machine, warn_long_trainings
from seqlm.threads import training_slots
from seqlm.runtime.workspace import Wait, run_record, workspace_lock

log = logging.getLogger("seqlm.pipeline")
WORKSPACE_POLL_S = 5.0          # how often a waiting run tries the busy workspace again


@dataclass
class Session:
    parent: tracking.Run          # the pipeline's MLflow run
    news: RunNews                 # what the run tells the Prefect server (seqlm notify)


@contextlib.contextmanager
def pipeline_session(params: Params, record_dvc: bool, deadline: Deadline,
                     news: RunNews) -> Iterator[Session]:
    """Hold the workspace (and DVC's lock), check what can be checked before any stage runs,
    close what a killed run left open, and open the run's MLflow parent run and training
    slots; on the way out close them FINISHED, or KILLED / FAILED with the stages told to stop."""
    deployed = news.top is not None and news.top.deployment_id is not None
    with interrupt.stop_on_signals(), workspace_lock(
            "seqlm run" if not deployed else f"the deployment run {news.top.name}",
            dvc=record_dvc, wait=waiting_for_workspace(deadline) if deployed else None):
        tracking.check_store()          # an unusable store fails now, not after the stages
        check_machine(params)
        warn_long_trainings(params, log)
        if record_dvc:
            check_dvc_lock()
        with run_record(log) as record:
            flow_run = FlowRunContext.get().flow_run
            flow_run_id = str(flow_run.id)
            limit = open_training_slots(flow_run_id, training_slots(params)) \
                if slots_can_bind(params) else None
            record.set(flow_run_id=flow_run_id, server_pid=server.started_pid,
                       training_limit=limit, mlflow_uri=tracking.tracking_uri())
            parent = tracking.Run(params, flow_run.name)
            parent.open({**tracking.source_tags(params, "pipeline"), **tracking.PIPELINE_TAG,
                         "prefect.flow_run_id": flow_run_id,
                         "prefect.flow_run_url": prefect_run_url(flow_run_id)})
            parent.log_params(tracking.flatten(params.model_dump(mode="json")))
            link_mlflow_run(parent)
            if parent.url():
                news.label(mlflow_run=parent.url())
            try:
                yield Session(parent, news)
            except BaseException as exc:
                interrupted = isinstance(exc, (KeyboardInterrupt, interrupt.Interrupted))
                if not interrupted:
                    parent.set_tags({"failure_reason": f"{type(exc).__name__}: {exc}"[:5000]})
                parent.finish("KILLED" if interrupted else "FAILED")
                raise
            else:
                parent.finish()
            finally:
                if limit:
                    close_training_slots(limit)


def waiting_for_workspace(deadline: Deadline) -> Wait:
    """For a run a deployment started: wait while the workspace is busy (said once in the log),
    until the run's deadline."""
    said = False

    def wait(busy: str) -> None:
        nonlocal said
        if not said:
            log.warning("waiting for the workspace: %s", busy)
            said = True
        deadline.check(f"waiting for the workspace: {busy}")
        time.sleep(min(WORKSPACE_POLL_S, max(deadline.remaining(), 0.1)))
    return wait


def slots_can_bind(params: Params) -> bool:
    """Whether the run needs its training slots: on the local runner (Dask has a GPU resource
    per training), with more trainings than slots. A limit that could never hold a training back
    is not created: besides two API calls, its deletion at the end of a run met the server's
    SQLite busy with the run's last writes and waited for Prefect's 2 s retry."""
    return (params.execution.task_runner == "local"
            and len(params.train_lm.models) > training_slots(params))


def training_limit(flow_run_id: str) -> str:
    return f"training-{flow_run_id}"


def open_training_slots(flow_run_id: str, slots: int) -> str:
    """A global concurrency limit owned by this run for its trainings: `slots` at a time
    (seqlm.threads.training_slots). Prefect's limits outlive a killed process's slots;
    owned by the run, this one is deleted when the run ends, and a killed run's by the next run:
    no slot is ever held for a run that is gone."""
    name = training_limit(flow_run_id)
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
    return name


def close_training_slots(name: str) -> None:
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectNotFound):
        client.delete_global_concurrency_limit_by_name(name)


@contextlib.contextmanager
def training_slot(params: Params) -> Iterator[None]:
    """One of the pipeline run's training slots, held while a training trains (a cached
    training takes none). Outside a pipeline run (`seqlm stage`), on Dask (one `GPU` resource
    per training) and with no more trainings than slots there are none to take."""
    flow_run = tracking.flow_run_id()
    if flow_run is None or not slots_can_bind(params):
        yield
        return
    with concurrency(training_limit(flow_run), occupy=1):
        yield


def prefect_run_url(flow_run_id: str) -> str:
    """The flow run in the Prefect UI: the server's own, or for a temporary server the UI of
    `prefect server start`, which reads the same database (seqlm.runtime.server)."""
    from prefect.settings import PREFECT_UI_URL
    return f"{(PREFECT_UI_URL.value() or server.LASTING_UI).rstrip('/')}/runs/flow-run/{flow_run_id}"


def link_mlflow_run(run: tracking.Run) -> None:
    url = run.url()
    if url is None:
        return
    from prefect.artifacts import create_markdown_artifact
    create_markdown_artifact(
        key="mlflow-run", description="The MLflow run of this pipeline run",
        markdown=f"MLflow run [{run.run_id}]({url}) in experiment "
                 f"`{run.params.tracking.experiment}` of `{run.uri}`")
    log.info("MLflow run: %s", url)
