"""The `pipeline` flow: walks the stage graph of seqlm/stages.py as Prefect tasks.

Each stage is cached on what it reads (its params, the contents of its deps, its code), the
same inputs DVC hashes, so a re-run skips unchanged stages; a stage whose outputs were deleted
runs again. At the end dvc.lock is updated to describe exactly the artifacts written
(`dvc commit`) and they are pushed to the DVC remote.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_client, get_run_logger
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectNotFound
from prefect.futures import PrefectFuture
from prefect.states import State

from seqlm import server
from seqlm.interrupt import Interrupted, stop_on_signals
from seqlm.io import file_digest, write_json
from seqlm.params import PARAMS_FILE, Params, load_params
from seqlm.preflight import check_machine, check_preprocessed
from seqlm.stage_logging import StageLogger
from seqlm.stages import STAGE_BY_NAME, STAGES, Stage
from seqlm.tracking import FIX_URI, Tracker, TrackingError, check_store, tracking_uri
from seqlm.workspace import (RunRecord, close_unfinished, dvc_lock_released, unfinished_run,
                             workspace_lock)
from tasks import stage_task
from tasks.ngrams import SHARDS, ngrams_shard, shard_plan

StageKey = tuple[str, str | None]
STAGE_RECORD = Path(".stage-record.json")   # per workspace, like checkpoints/ (git-ignored)


def content_digest(path: Path) -> str:
    """sha256 over a file, or over every file of a folder with its relative path."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        inner = file.relative_to(path).parts if path.is_dir() else (file.name,)
        if any(part.startswith(".") for part in inner):  # leftovers of an interrupted write
            continue
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        digest.update(file_digest(file).encode())
    return digest.hexdigest()


def stage_cache_key(stage: Stage, item: str | None, params: Params) -> str:
    """What DVC would compare: the stage's params and the contents of its deps (code included)."""
    digest = hashlib.sha256(f"{stage.name}|{item}|{params.digest(list(stage.params))}".encode())
    for dep in stage.paths(params, item)["deps"]:
        path = Path(dep)
        digest.update(f"|{dep}:{content_digest(path) if path.exists() else 'missing'}".encode())
    return f"stage-{stage.name}-{item or ''}-{digest.hexdigest()[:32]}"


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def upstream(stage: Stage, item: str | None, params: Params) -> list[StageKey]:
    """Stages whose outputs this stage reads: the edges DVC derives from the same paths."""
    deps = stage.paths(params, item)["deps"]
    return [(other.name, other_item) for other in STAGES for other_item in other.items(params)
            if other is not stage and any(_overlaps(dep, out) for dep in deps
                                          for out in _written(other, other_item, params))]


def _written(stage: Stage, item: str | None, params: Params) -> list[str]:
    return stage.written(params, item)


def outputs_digest(stage: Stage, item: str | None, params: Params) -> str:
    digest = hashlib.sha256()
    for out in _written(stage, item, params):
        path = Path(out)
        digest.update(f"|{out}:{content_digest(path) if path.exists() else 'missing'}".encode())
    return digest.hexdigest()


class StageRecord:
    """What each stage's last run in this workspace read (its cache key) and wrote (a digest of
    its outputs). A cached result is reused only when both still hold: outputs that were
    deleted, edited, or left by a run with other inputs make the stage run again."""

    def __init__(self, path: Path = STAGE_RECORD) -> None:
        self.path = path
        self.entries: dict[str, list[str]] = (json.loads(path.read_text()) if path.exists() else {})

    def is_current(self, label: str, key: str, outputs: str) -> bool:
        return self.entries.get(label) == [key, outputs]

    def update(self, label: str, key: str, outputs: str) -> None:
        self.entries[label] = [key, outputs]
        write_json(self.path, self.entries)


def is_stale(stage: Stage, item: str | None, params: Params, record: StageRecord,
             key: str) -> bool:
    """Whether the stage must run: a source fetched every run, or inputs or outputs that are not
    those its last run in this workspace read and wrote."""
    return (fetches_every_run(stage, params) or
            not record.is_current(_label(stage.name, item), key,
                                  outputs_digest(stage, item, params)))


def submit_stage(stage: Stage, item: str | None, params: Params, stage_logger: StageLogger,
                 key: str, stale: bool, tags: list[str], wait_for: list[State],
                 inputs: dict[str, Any] | None = None) -> PrefectFuture:
    """Submit one stage whose upstream stages have finished, so its inputs are final.
    `wait_for` holds their final states: Prefect draws the edges of the DAG from them, and Dask
    is free to run the stage on any worker (an upstream future would pin it to the worker that
    holds that result, and Dask never moves a task that asks for a resource such as `GPU`).
    `inputs`: more arguments of the task (futures of tasks it reads the results of)."""
    task = stage_task(stage.name, params).with_options(
        name=_label(stage.name, item),
        cache_key_fn=lambda _ctx, _args: key,
        persist_result=True,
        refresh_cache=stale,
        tags=tags,
    )
    dask = params.execution.task_runner == "dask"
    # On Dask the task runs in a worker process: no live callback (it is not picklable), and a
    # training asks for one `GPU` resource, so that each runs on a worker of its own.
    kwargs = {**stage_logger.task_kwargs(stage.name, item, live=not dask), **(inputs or {})}
    args = (params, item) if item is not None else (params,)
    resources = {"GPU": 1} if dask and stage.name == "train_lm" else {}
    with dask_annotations(resources):
        return task.submit(*args, wait_for=wait_for, **kwargs)


def fan_out_ngrams(params: Params, wait_for: list[State],
                   logger: logging.Logger | logging.LoggerAdapter) -> dict[str, Any]:
    """With ngrams.shard_tokens set: one `ngrams_shard` task per shard of each corpus (spread
    over the Dask workers), whose futures become the `ngrams` task's `partials` argument, so
    that it reduces their counts and the UI draws an edge from every shard."""
    shutil.rmtree(SHARDS, ignore_errors=True)         # partials a killed run left behind
    plan = shard_plan(params)
    partials = {level: [ngrams_shard.with_options(name=f"ngrams_shard[{level}:{start}]").submit(
                            params, level, start, stop, wait_for=wait_for)
                        for start, stop in bounds] for level, bounds in plan.items()}
    logger.info("ngrams: %s shard tasks of %d tokens", " + ".join(
        f"{len(bounds)} {level}" for level, bounds in plan.items()), params.ngrams.shard_tokens)
    return {"partials": partials}


@contextlib.contextmanager
def dask_annotations(resources: dict[str, int]):
    if not resources:
        yield
        return
    import dask
    with dask.annotate(resources=resources):
        yield


def task_runner_for(params: Params):
    """The Prefect task runner `execution` asks for: threads of this process, or Dask."""
    from prefect.task_runners import ThreadPoolTaskRunner
    ex = params.execution
    if ex.task_runner == "local":
        return ThreadPoolTaskRunner()
    from prefect_dask import DaskTaskRunner
    if ex.dask_address:
        return DaskTaskRunner(address=ex.dask_address)
    import torch
    gpus = torch.cuda.device_count()
    # One worker per GPU, or per core on a CPU machine, each with one `GPU` slot for trainings.
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": gpus or os.cpu_count() or 1, "threads_per_worker": 1,
        "processes": True, "resources": {"GPU": 1}, "dashboard_address": None})


def worker_of(future: PrefectFuture) -> str:
    """Where a task ran: the Dask worker that holds its result, or this host."""
    wrapped = getattr(future, "wrapped_future", None)
    if type(wrapped).__module__.startswith("distributed"):
        holders = wrapped.client.who_has(wrapped).get(wrapped.key)
        if holders:
            return holders[0]
    return socket.gethostname()


def fetches_every_run(stage: Stage, params: Params) -> bool:
    """A download without a checksum reads a source that may change: it runs every time, and
    the stages after it run again only when the content it fetched changed."""
    return stage.name == "download" and params.download.checksum is None


def _label(name: str, item: str | None) -> str:
    return f"{name}[{item}]" if item else name


def dvc_record(logger: logging.Logger | logging.LoggerAdapter) -> None:
    """Make dvc.lock describe the artifacts just written, and push them to the default remote."""
    if not Path(".dvc").is_dir():
        logger.warning("not a DVC repository (no .dvc/): dvc.lock not updated")
        return
    # The CLI, not the Python API: DVC's Python API is read-only. This interpreter's own DVC, so
    # it works without an activated virtual environment.
    for args in (["commit", "--force"], ["push"]):
        result = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
        if result.returncode != 0:
            output = " ".join((result.stderr or result.stdout).split())
            raise RuntimeError(f"`dvc {' '.join(args)}` failed: {output}")
    logger.info("dvc.lock updated and artifacts pushed to the DVC remote")


TRAININGS = ("train_ar", "train_lm")
TRAINING_SLOTS = 1   # trainings side by side: one device (the CPU, or the first GPU) each


def open_training_slots(flow_run_id: str) -> str:
    """A concurrency limit owned by this run for its training tasks (tag `training-<run id>`):
    two trainings on one device would only fight over it. Owned by the run, it is deleted when
    the run ends, and a killed run's limit is deleted by the next run: it can never hold a slot
    that another run waits for."""
    tag = f"training-{flow_run_id}"
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=tag, concurrency_limit=TRAINING_SLOTS)
    return tag


def close_training_slots(tag: str) -> None:
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectNotFound):
        client.delete_concurrency_limit_by_tag(tag)


def run_name() -> str:
    """The readable name the Prefect flow run and the MLflow parent run share: when it started
    and which params it ran (date-time-params hash)."""
    from prefect.runtime import flow_run
    params_file = flow_run.parameters.get("params_file", str(PARAMS_FILE))
    started = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    return f"{started}-{load_params(params_file).digest()[:8]}"


def in_levels(params: Params) -> list[StageKey]:
    """Every (stage, item) in topological order, level by level: stages that do not depend on
    each other come together, so they are submitted together."""
    level: dict[StageKey, int] = {}
    for stage in STAGES:
        for item in stage.items(params):
            level[(stage.name, item)] = 1 + max(
                (level[key] for key in upstream(stage, item, params)), default=-1)
    # No training is submitted before preprocess: the corpus checks (check_preprocessed) come
    # first, so a split or a batch that cannot fit fails before any model is trained. The DAG
    # (wait_for) is unchanged: only the submission order.
    gate = level[("preprocess", None)] + 1
    order = {key: max(lvl, gate) if key[0] in TRAININGS else lvl for key, lvl in level.items()}
    # Within a level the trainings first: the longest tasks get the free workers.
    return sorted(order, key=lambda key: (order[key], key[0] != "train_lm"))


@flow(name="pipeline", log_prints=True, flow_run_name=run_name)
def pipeline(params_file: str = str(PARAMS_FILE), record_dvc: bool = True) -> dict[str, str]:
    """Run every stage whose inputs changed; returns {stage: final state name}."""
    with workspace_lock("seqlm run", dvc=record_dvc), stop_on_signals():
        return _run_stages(params_file, record_dvc)


def _run_stages(params_file: str, record_dvc: bool) -> dict[str, str]:
    logger = get_run_logger()
    params = load_params(params_file)
    check_store()                       # an unusable store fails now, not after the stages
    check_machine(params)
    killed = unfinished_run()
    run = RunRecord()
    if killed is not None:
        close_unfinished(killed, logger)
    context = FlowRunContext.get().flow_run
    flow_run_id = str(context.id)
    dask = params.execution.task_runner == "dask"
    tag = open_training_slots(flow_run_id) if not dask else ""   # on Dask: GPU resources
    run.set(flow_run_id=flow_run_id, server_pid=server.started_pid, concurrency_tag=tag,
            mlflow_uri=tracking_uri())
    tracker = Tracker(params, on_open=run.add_mlflow_run)
    tracker.start(context.name, tags={"prefect.flow_run_id": flow_run_id,
                                      "prefect.flow_run_url": prefect_run_url(flow_run_id)})
    link_mlflow_run(tracker, logger)
    stage_logger = StageLogger(tracker, params)

    record = StageRecord()
    futures: dict[StageKey, tuple[PrefectFuture, str]] = {}
    states: dict[str, str] = {}
    logged: set[StageKey] = set()

    def log_finished(block_on: list[StageKey] = ()) -> None:
        """Log every stage that has finished (MLflow runs end with their stage); return once
        the stages in block_on have."""
        while True:
            for key, (future, cache_key) in futures.items():
                if key not in logged and future.wrapped_future.done():
                    logged.add(key)
                    finished(key, future, cache_key)
            if all(key in logged for key in block_on):
                return
            for key in block_on:
                if key not in logged:
                    futures[key][0].wait(timeout=0.5)   # Prefect's futures: threads or Dask
                    break

    def finished(key: StageKey, future: PrefectFuture, cache_key: str) -> None:
        name, item = key
        paths = future.result()                        # a failed stage raises here
        label = _label(name, item)
        cached = future.state.name == "Cached"
        states[label] = future.state.name
        record.update(label, cache_key, outputs_digest(STAGE_BY_NAME[name], item, params))
        if cached:
            logger.info("stage %s unchanged: skipped (cached)", label)
        stage_logger.after(name, item, paths, cached=cached, worker=worker_of(future))

    try:
        corpus_checked = False
        trainings = [key for key in in_levels(params) if key[0] == "train_lm"]
        if len(trainings) > TRAINING_SLOTS and not dask:
            logger.info("%d trainings, %d at a time on this device: %s wait for a slot",
                        len(trainings), TRAINING_SLOTS,
                        ", ".join(_label(*key) for key in trainings[TRAINING_SLOTS:]))
        for name, item in in_levels(params):
            stage = STAGE_BY_NAME[name]
            ups = upstream(stage, item, params)
            # inputs final before this stage's key is taken; the corpus checked before the
            # first stage that reads it or trains: what needs the corpus's size fails now
            gated = ("preprocess", None) in ups or name in TRAININGS
            log_finished(block_on=ups + ([("preprocess", None)] if gated else []))
            if gated and not corpus_checked:
                check_preprocessed(params)
                corpus_checked = True
            key = stage_cache_key(stage, item, params)
            stale = is_stale(stage, item, params, record, key)
            wait_for = [futures[up][0].state for up in ups]
            inputs = (fan_out_ngrams(params, wait_for, logger)
                      if name == "ngrams" and stale and params.ngrams.shard_tokens else None)
            futures[(name, item)] = (submit_stage(
                stage, item, params, stage_logger, key, stale,
                tags=[tag] if name == "train_lm" and tag else [], wait_for=wait_for,
                inputs=inputs), key)
        log_finished(block_on=list(futures))
        stage_logger.finish()
        if record_dvc and Path(params_file).resolve() != PARAMS_FILE.resolve():
            logger.warning("params from %s, not %s: dvc.lock not updated (it describes the "
                           "outputs of %s; use `dvc exp run -S key=value` for DVC experiments)",
                           params_file, PARAMS_FILE, PARAMS_FILE)
        elif record_dvc:
            with dvc_lock_released():
                dvc_record(logger)
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, (KeyboardInterrupt, Interrupted)) else "FAILED"
        stage_logger.end_runs(status)
        tracker.finish(status)
        if tag:
            close_training_slots(tag)
        run.finish()
        raise
    tracker.finish("FINISHED")
    if tag:
        close_training_slots(tag)
    run.finish()
    if tracker.error:
        raise TrackingError(
            f"MLflow store {tracking_uri()!r} failed ({tracker.error}); all pipeline artifacts "
            f"were written. {FIX_URI} and re-run: unchanged stages are skipped.")
    return {_label(*key): states[_label(*key)] for key in in_levels(params)}


def prefect_run_url(flow_run_id: str) -> str:
    """The flow run in the Prefect UI: the server's own, or for a temporary server the UI of
    `prefect server start`, which reads the same database."""
    from prefect.settings import PREFECT_UI_URL
    ui = None if server.started_pid else PREFECT_UI_URL.value()
    return f"{(ui or 'http://127.0.0.1:4200').rstrip('/')}/runs/flow-run/{flow_run_id}"


def link_mlflow_run(tracker: Tracker, logger: logging.Logger | logging.LoggerAdapter) -> None:
    url = tracker.run_url()
    if url is None:
        return
    from prefect.artifacts import create_markdown_artifact
    create_markdown_artifact(
        key="mlflow-run", description="The MLflow run of this pipeline run",
        markdown=f"MLflow run [{tracker.run_id}]({url}) in experiment "
                 f"`{tracker.params.tracking.experiment}` of `{tracker.uri}`")
    logger.info("MLflow run: %s", url)
