"""The `pipeline` flow: every stage of seqlm/stages.py as a Prefect task, submitted with the
futures of the stages it reads, so that Prefect (threads or Dask) schedules them and the UI draws
the DAG. A stage whose inputs and outputs are unchanged is Cached (seqlm.runtime.records); at the
end dvc.lock is made to describe the artifacts (`dvc commit`) and they are pushed to the DVC
remote. `seqlm run`, `seqlm schedule` and a Prefect worker (prefect.yaml) all run this flow.
"""
from __future__ import annotations

import datetime
import logging
import queue
import subprocess
import sys
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture, wait

from seqlm import tracking
from seqlm.params import PARAMS_FILE, Params, load_params
from seqlm import data_change, interrupt
from seqlm.runtime.deadline import Deadline, RunTimedOut
from seqlm.runtime.news import RunNews
from seqlm.runtime.preflight import check_dask_address
from seqlm.runtime.runners import local_runner, one_gpu_each, task_runner_for
from seqlm.runtime.session import Session, pipeline_session, prefect_run_url
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
    deadline = Deadline.of(params, log)
    news = RunNews()
    news.label(prefect_run=prefect_run_url(str(news.top.id)))    # the message's link to the run
    doing = Doing("start-up (the workspace, the machine, the MLflow store, dvc.lock)")
    try:
        return _run(params, params_file, record_dvc, deadline, news, doing)
    except Exception as exc:
        news.failed(doing.now, exc)         # for the message of a failed run (seqlm notify)
        raise


class Doing:
    """What the run is doing: the stage a failure is told of."""

    def __init__(self, now: str) -> None:
        self.now = now


def _run(params: Params, params_file: str, record_dvc: bool, deadline: Deadline,
         news: RunNews, doing: Doing) -> dict[str, str]:
    with pipeline_session(params, record_dvc, deadline, news) as session:
        futures: dict[str, PrefectFuture] = {}
        records: dict[str, dict] = {}
        announcements = Announcements(params, session)
        try:
            deadline.check("before its first stage")
            doing.now = "submitting the stages"
            submit_stages(params, futures)
            for label, future in _completed(futures, records, deadline):
                doing.now = label
                records[label] = _finished(future, session)
                announcements.finished(label, future.state.name == "Cached", records[label])
        except BaseException as exc:
            # A failed stage, the deadline or Ctrl-C: the stages still running stop within a
            # batch (their last checkpoints kept) before the run ends.
            if isinstance(exc, RunTimedOut):
                doing.now = ", ".join(_running(futures, records)) or doing.now
            interrupt.stop_and_wait(list(futures.values()))
            raise
        finally:
            announcements.flush()
        doing.now = "the report"
        _report(params, session, records, futures)
        if record_dvc:
            doing.now = "dvc commit and push"
            _record_in_dvc(params_file, records)
        tracking.log_lock(session.parent)
    errors = [session.parent.error, *(r.get("tracking_error") for r in records.values())]
    if any(errors):
        doing.now = "MLflow tracking"
        raise tracking.TrackingError(
            f"MLflow store {tracking.tracking_uri()!r} failed ({next(e for e in errors if e)}); "
            f"all pipeline artifacts were written. {tracking.FIX_URI} and re-run: unchanged "
            "stages are skipped.")
    return {node.label: futures[node.label].state.name for node in nodes(params)}


class Announcements:
    """What the stages that ran tell: the change of the corpus (an unpinned source, after its
    ngrams stage ran), into the MLflow run and the flow run's labels, and every champion
    decision of a training that ran, as a Prefect event carrying that change; a decision waits
    for the change to be known, so that its message tells it."""

    def __init__(self, params: Params, session: Session) -> None:
        self.session = session
        # Kept before the ngrams stage replaces the tables: the last run's, to compare with.
        self.comparing = params.download.checksum is None and data_change.keep_previous()
        self.decisions: list[dict] = []

    def finished(self, label: str, cached: bool, record: dict) -> None:
        """A stage ended; a cached one changed nothing and retrained nothing."""
        if label == "ngrams" and self.comparing:
            self.comparing = False
            if not cached:
                self._record_change()
        if not cached and record.get("champion"):
            self.decisions.append(record["champion"])
        if not self.comparing:
            self.flush()

    def _record_change(self) -> None:
        try:
            change = data_change.describe()
        except Exception as exc:  # noqa: BLE001 - a record of the run, never its failure
            log.warning("could not compare the corpus with the last run's: %s", exc)
            return
        if change is None:
            return
        summary = data_change.summary(change)
        log.info("%s", summary)
        self.session.parent.log_metrics(data_change.metrics(change))
        self.session.parent.log_dict(change, "data_change.json")
        self.session.news.changed_data(summary)

    def flush(self) -> None:
        """Announce the decisions taken so far."""
        for decision in self.decisions:
            self.session.news.champion(decision)
        self.decisions.clear()


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


def _completed(futures: dict[str, PrefectFuture], records: dict[str, dict],
               deadline: Deadline):
    """(label, future) as each stage finishes: a failing stage ends the run at once, and so
    does the deadline (RunTimedOut), whatever the stages are doing."""
    labels = {id(future): label for label, future in futures.items()}
    done: queue.SimpleQueue[PrefectFuture] = queue.SimpleQueue()
    for future in futures.values():
        future.add_done_callback(done.put)
    for _ in futures:
        while True:
            try:
                future = done.get(timeout=deadline.remaining())
                break
            except queue.Empty:
                if deadline.passed():
                    raise deadline.timed_out(
                        f"while {', '.join(_running(futures, records))} ran: stopped, with "
                        "their last checkpoints kept; the next run resumes") from None
        yield labels[id(future)], future


def _running(futures: dict[str, PrefectFuture], records: dict[str, dict]) -> list[str]:
    """The stages that started and have not ended (or, if none is known to have started, all
    that have not ended)."""
    unfinished = [label for label in futures if label not in records]
    started = []
    for label in unfinished:
        try:
            if futures[label].state.is_running():
                started.append(label)
        except Exception:  # noqa: BLE001 - a state that cannot be read: not known to run
            continue
    return started or unfinished


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
