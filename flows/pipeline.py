"""The `pipeline` flow: every stage of seqlm/stages.py as a Prefect task, submitted with the
futures of the stages it reads, so that Prefect (threads or Dask) schedules them and the UI draws
the DAG. A stage whose inputs and outputs are unchanged is Cached (seqlm.runtime.records); at the
end dvc.lock is made to describe the artifacts (`dvc commit`) and they are pushed to the DVC
remote. `seqlm run`, `seqlm schedule` and a Prefect worker (prefect.yaml) all run this flow.
"""
from __future__ import annotations

import datetime
import logging
import subprocess
import sys
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture, as_completed, wait

from seqlm import tracking
from seqlm.params import PARAMS_FILE, Params, load_params
from seqlm import interrupt
from seqlm.runtime.preflight import check_dask_address
from seqlm.runtime.runners import local_runner, one_gpu_each, task_runner_for
from seqlm.runtime.session import Session, pipeline_session
from seqlm.runtime.workspace import dvc_lock_released, dvc_recorded, dvc_state, record_dvc
from seqlm.stages import nodes
from tasks import task_of
from tasks.ngrams import submit_sharded

log = logging.getLogger("seqlm.pipeline")


def run_name() -> str:
    """The readable name the Prefect flow run and the MLflow parent run share: when it started
    and which params it ran (date-time-params hash)."""
    from prefect.runtime import flow_run
    params_file = flow_run.parameters.get("params_file", str(PARAMS_FILE))
    started = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    return f"{started}-{load_params(params_file).digest()[:8]}"


@flow(name="pipeline", log_prints=True, flow_run_name=run_name, task_runner=local_runner())
def pipeline(params_file: str = str(PARAMS_FILE), record_dvc: bool = True) -> dict[str, str]:
    """Run every stage whose inputs changed; returns {stage: final state name}."""
    params = load_params(params_file)
    if params.execution.task_runner == "dask" and not _on_dask():
        # A flow's task runner is fixed where the flow is defined (threads); a worker or
        # `seqlm schedule` loads that definition: the stages run in a subflow on Dask instead.
        # Its runner connects first: an address nothing answers on fails here, in milliseconds.
        check_dask_address(params.execution.dask_address)
        return pipeline.with_options(task_runner=task_runner_for(params))(
            params_file=params_file, record_dvc=record_dvc)
    with pipeline_session(params, record_dvc) as session:
        futures: dict[str, PrefectFuture] = {}
        try:
            submit_stages(params, futures)
            records = {label: _finished(future, session) for label, future in _completed(futures)}
        except BaseException:
            # A failed stage or Ctrl-C: the stages still running stop within a batch (their
            # last checkpoints kept) before the run ends.
            interrupt.stop_and_wait(list(futures.values()))
            raise
        _report(params, session, records, futures)
        if record_dvc:
            _record_in_dvc(params_file, records)
        tracking.log_lock(session.parent)
    errors = [session.parent.error, *(r.get("tracking_error") for r in records.values())]
    if any(errors):
        raise tracking.TrackingError(
            f"MLflow store {tracking.tracking_uri()!r} failed ({next(e for e in errors if e)}); "
            f"all pipeline artifacts were written. {tracking.FIX_URI} and re-run: unchanged "
            "stages are skipped.")
    return {node.label: futures[node.label].state.name for node in nodes(params)}


def submit_stages(params: Params, futures: dict[str, PrefectFuture]) -> None:
    """Every stage task, with its upstream futures, into `futures` by label."""
    dask = params.execution.task_runner == "dask"
    sharded = params.ngrams.shard_tokens is not None
    for node in sorted(nodes(params), key=lambda n: submitted_late(n.stage.name, sharded)):
        upstream = [futures[label] for label in node.upstream]
        if sharded and node.stage.name == "ngrams":
            futures[node.label] = submit_sharded(params, upstream)
            continue
        training = node.stage.name == "train_lm"
        wait_for: list = upstream
        if training and dask:
            # Dask runs a task beside the results it depends on and never moves one that asks
            # for a resource: with preprocess's future as a dependency every training would
            # queue on preprocess's worker. Its final state draws the same edge in Prefect.
            wait(upstream)
            wait_for = [future.state for future in upstream]
        task = task_of(node.stage.name, params).with_options(name=node.label)
        args = (params, node.item) if node.item is not None else (params,)
        with one_gpu_each(dask and training):
            futures[node.label] = task.submit(*args, wait_for=wait_for)


def submitted_late(stage: str, sharded: bool) -> int:
    """When a stage is submitted, after the ones it reads: the trainings (the longest tasks)
    right after their inputs, so that they get the first workers free; the sharded n-gram count
    last, as it plans its shards from the corpus and waits for preprocess (nothing reads the
    n-grams)."""
    if sharded and stage == "ngrams":
        return 2
    return 0 if stage in ("download", "preprocess", "train_lm") else 1


def _completed(futures: dict[str, PrefectFuture]):
    """(label, future) as each stage finishes: a failing stage ends the run at once."""
    labels = {id(future): label for label, future in futures.items()}
    for future in as_completed(list(futures.values())):
        yield labels[id(future)], future


def _finished(future: PrefectFuture, session: Session) -> dict:
    record = future.result()                       # a failed stage raises here
    tracking.log_record(session.parent, record, cached=future.state.name == "Cached")
    return record


def _report(params: Params, session: Session, records: dict[str, dict],
            futures: dict[str, PrefectFuture]) -> None:
    """The evaluation table in the terminal and in the Prefect UI, and on the MLflow run the
    stages that were cached and the runs that made them."""
    evaluation = records["evaluate"]
    print(evaluation["summary"])
    create_table_artifact(table=evaluation["table"], key="perplexity-summary",
                          description="Train/validation perplexity of each language model "
                                      "beside the character n-gram baselines")
    cached = [node.label for node in nodes(params) if futures[node.label].state.name == "Cached"]
    if cached:
        session.parent.set_tags({
            "cached_stages": ", ".join(cached),
            # tag keys take no brackets: train_lm[rnn] -> cached_by.train_lm.rnn
            **{f"cached_by.{label.replace('[', '.').rstrip(']')}": records[label]["mlflow_run"]
               for label in cached if records[label].get("mlflow_run")}})


DVC_COMMIT_AND_PUSH = """
import sys
from dvc.cli import main
for args in (["commit", "--force"], ["push"]):
    if main(args) != 0:
        sys.exit(f"`dvc {' '.join(args)}` failed")
"""


def _record_in_dvc(params_file: str, records: dict[str, dict]) -> None:
    """Make dvc.lock describe the artifacts just written, and push them to the default remote;
    nothing to do (a second) when the last run that did left everything as it is now."""
    if Path(params_file).resolve() != PARAMS_FILE.resolve():
        log.warning("params from %s, not %s: dvc.lock not updated (it describes the outputs of "
                    "%s; use `dvc exp run -S key=value` for DVC experiments)", params_file,
                    PARAMS_FILE, PARAMS_FILE)
        return
    if not Path(".dvc").is_dir():
        log.warning("not a DVC repository (no .dvc/): dvc.lock not updated")
        return
    if dvc_recorded() == dvc_state(records):
        log.info("dvc.lock already describes these artifacts, and the DVC remote has them")
        return
    # DVC's CLI, not its Python API (read-only), in one child process of this interpreter (it
    # works without an activated virtual environment; DVC is imported once for both commands).
    with dvc_lock_released():
        result = subprocess.run([sys.executable, "-c", DVC_COMMIT_AND_PUSH], capture_output=True,
                                text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"dvc failed: {' '.join((result.stderr or result.stdout).split())}")
    record_dvc(dvc_state(records))
    log.info("dvc.lock updated and artifacts pushed to the DVC remote")


def _on_dask() -> bool:
    from prefect.context import FlowRunContext
    return type(FlowRunContext.get().task_runner).__name__ == "DaskTaskRunner"
