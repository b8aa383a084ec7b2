"""The `pipeline` flow: walks the stage graph of seqlm/stages.py as Prefect tasks.

Each stage is cached on what it reads (its params, the contents of its deps, its code), the
same inputs DVC hashes, so a re-run skips unchanged stages; a stage whose outputs were deleted
or changed runs again (its persisted result records what it wrote: recorded()). At the end
dvc.lock is updated to describe exactly the artifacts written (`dvc commit`) and they are
pushed to the DVC remote.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

from prefect import Task, flow, get_client, get_run_logger
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectNotFound
from prefect.futures import PrefectFuture
from prefect.results import ResultStore, get_result_store
from prefect.states import State

from seqlm import server
from seqlm.interrupt import Interrupted, stop_on_signals
from seqlm.io import file_digest
from seqlm.params import PARAMS_FILE, Params, load_params
from seqlm.preflight import check_machine, check_preprocessed
from seqlm.stage_logging import StageLogger
from seqlm.stages import STAGE_BY_NAME, STAGES, Stage
from seqlm.threads import cores, training_slots
from seqlm.tracking import FIX_URI, Tracker, TrackingError, check_store, tracking_uri
from seqlm.workspace import (RunRecord, close_unfinished, dvc_lock_released, unfinished_run,
                             workspace_lock)
from tasks import stage_task
from tasks.ngrams import SHARDS, ngrams_reduce, ngrams_shard, shard_plan

StageKey = tuple[str, str | None]


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


class StageResult(NamedTuple):
    """What a stage task returns (and Prefect persists): the paths it wrote and their digest.
    A tuple, not a dict: Prefect links a downstream task to every object of an upstream result
    it finds among its inputs, and a dict's keys are strings shared by every stage's result."""
    paths: list[Path]
    outputs: str


def recorded(stage: Stage, task: Task) -> Task:
    """The stage's task, returning with its paths the digest of the outputs it has just written.
    What Prefect persists under the stage's cache key is then the one record of the stage: the
    key says what it read (params, code, input files), the digest what it wrote. It is written
    where the task runs (a Dask worker too), and read by is_stale()."""
    def run(params: Params, *args: Any, **kwargs: Any) -> StageResult:
        paths = task.fn(params, *args, **kwargs)
        item = args[0] if stage.foreach else None
        return StageResult(paths, outputs_digest(stage, item, params))
    run.__name__ = task.fn.__name__
    return Task(run, name=task.name, retries=task.retries,
                retry_delay_seconds=task.retry_delay_seconds,
                retry_condition_fn=task.retry_condition_fn, tags=task.tags)


def recorded_outputs(key: str) -> str | None:
    """The digest of the outputs the last run of the stage with this cache key wrote, from
    Prefect's persisted result; None when there is none (or one of an older format)."""
    # Where the tasks persist their results; records and metadata together, as a task's store
    # reads them (the flow's own store looks for metadata in a separate, null, storage).
    store = ResultStore(result_storage=get_result_store().result_storage)
    if not store.exists(key):
        return None
    value = store.read(key).result
    return value.outputs if isinstance(value, StageResult) else None


def is_stale(stage: Stage, item: str | None, params: Params, key: str) -> bool:
    """Whether the stage must run: a source fetched every run, no run yet with these inputs
    (key), or outputs on disk that are not the ones that run wrote (deleted, edited, or written
    since by a run with other inputs)."""
    if fetches_every_run(stage, params):
        return True
    written = recorded_outputs(key)
    return written is None or written != outputs_digest(stage, item, params)


def submit_stage(stage: Stage, item: str | None, params: Params, stage_logger: StageLogger,
                 key: str, stale: bool, tags: list[str], wait_for: list[State],
                 inputs: dict[str, Any] | None = None) -> PrefectFuture:
    """Submit one stage whose upstream stages have finished, so its inputs are final.
    `wait_for` holds their final states: Prefect draws the edges of the DAG from them, and Dask
    is free to run the stage on any worker (an upstream future would pin it to the worker that
    holds that result, and Dask never moves a task that asks for a resource such as `GPU`).
    `inputs`: more arguments of the task (futures of tasks it reads the results of)."""
    task = recorded(stage, stage_task(stage.name, params)).with_options(
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
    """With ngrams.shard_tokens set: one `ngrams_shard` task per shard of each corpus and one
    `ngrams_reduce` task per partition (spread over the Dask workers); the reduce futures become
    the `ngrams` task's `partitions` argument, so the UI draws the map, the reduce and the merge."""
    shutil.rmtree(SHARDS, ignore_errors=True)         # files a killed run left behind
    plan, partitions = shard_plan(params), params.ngrams.partitions
    reduced = {}
    for level, bounds in plan.items():
        shards = [ngrams_shard.with_options(name=f"ngrams_shard[{level}:{start}]").submit(
                      params, level, start, stop, wait_for=wait_for) for start, stop in bounds]
        reduced[level] = [ngrams_reduce.with_options(name=f"ngrams_reduce[{level}:{p}]").submit(
                              level, p, shards) for p in range(partitions)]
    logger.info("ngrams: %s shard tasks of %d tokens, %d reduce tasks per level", " + ".join(
        f"{len(bounds)} {level}" for level, bounds in plan.items()), params.ngrams.shard_tokens,
        partitions)
    return {"partitions": reduced}


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
        # As many threads as cores (Prefect's default is unbounded): hundreds of n-gram shard
        # tasks must not count, and hold their memory, all at once. Tasks start in the order
        # they are submitted, upstream first, so the tasks waiting on others cannot take every
        # thread; a training waiting for its slot waits on one that runs.
        return ThreadPoolTaskRunner(max_workers=max(2, cores()))
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


DVC_COMMIT_AND_PUSH = """
import sys
from dvc.cli import main
for args in (["commit", "--force"], ["push"]):
    if main(args) != 0:
        sys.exit(f"`dvc {' '.join(args)}` failed")
"""


def dvc_record(logger: logging.Logger | logging.LoggerAdapter) -> None:
    """Make dvc.lock describe the artifacts just written, and push them to the default remote."""
    if not Path(".dvc").is_dir():
        logger.warning("not a DVC repository (no .dvc/): dvc.lock not updated")
        return
    # DVC's CLI, not its Python API (read-only), in one child process of this interpreter (it
    # works without an activated virtual environment; DVC is imported once for both commands).
    result = subprocess.run([sys.executable, "-c", DVC_COMMIT_AND_PUSH], capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        output = " ".join((result.stderr or result.stdout).split())
        raise RuntimeError(f"dvc failed: {output}")
    logger.info("dvc.lock updated and artifacts pushed to the DVC remote")


TRAININGS = ("train_ar", "train_lm")


def open_training_slots(flow_run_id: str, slots: int) -> str:
    """A concurrency limit owned by this run for its training tasks (tag `training-<run id>`):
    `slots` trainings at a time (seqlm.threads.training_slots: on the CPU as many as the cores
    hold with train_lm.cpu_threads each; one on a GPU). Owned by the run, it is deleted when
    the run ends, and a killed run's limit is deleted by the next run: it can never hold a slot
    that another run waits for."""
    tag = f"training-{flow_run_id}"
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=tag, concurrency_limit=slots)
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
    slots = training_slots(params)
    tag = open_training_slots(flow_run_id, slots) if not dask else ""  # on Dask: GPU resources
    run.set(flow_run_id=flow_run_id, server_pid=server.started_pid, concurrency_tag=tag,
            mlflow_uri=tracking_uri())
    tracker = Tracker(params, on_open=run.add_mlflow_run)
    tracker.start(context.name, tags={"prefect.flow_run_id": flow_run_id,
                                      "prefect.flow_run_url": prefect_run_url(flow_run_id)})
    link_mlflow_run(tracker, logger)
    stage_logger = StageLogger(tracker, params)

    futures: dict[StageKey, PrefectFuture] = {}
    states: dict[str, str] = {}
    logged: set[StageKey] = set()

    def log_finished(block_on: list[StageKey] = ()) -> None:
        """Log every stage that has finished (MLflow runs end with their stage); return once
        the stages in block_on have."""
        while True:
            for key, future in futures.items():
                if key not in logged and future.wrapped_future.done():
                    logged.add(key)
                    finished(key, future)
            if all(key in logged for key in block_on):
                return
            for key in block_on:
                if key not in logged:
                    futures[key].wait(timeout=0.5)   # Prefect's futures: threads or Dask
                    break

    def finished(key: StageKey, future: PrefectFuture) -> None:
        name, item = key
        paths = future.result().paths                  # a failed stage raises here
        label = _label(name, item)
        cached = future.state.name == "Cached"
        states[label] = future.state.name
        if cached:
            logger.info("stage %s unchanged: skipped (cached)", label)
        stage_logger.after(name, item, paths, cached=cached, worker=worker_of(future))

    try:
        corpus_checked = False
        trainings = [key for key in in_levels(params) if key[0] == "train_lm"]
        if len(trainings) > slots and not dask:
            logger.info("%d trainings, %d at a time on this device: %s wait for a slot",
                        len(trainings), slots,
                        ", ".join(_label(*key) for key in trainings[slots:]))
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
            stale = is_stale(stage, item, params, key)
            wait_for = [futures[up].state for up in ups]
            inputs = (fan_out_ngrams(params, wait_for, logger)
                      if name == "ngrams" and stale and params.ngrams.shard_tokens else None)
            futures[(name, item)] = submit_stage(
                stage, item, params, stage_logger, key, stale,
                tags=[tag] if name == "train_lm" and tag and stale else [], wait_for=wait_for,
                inputs=inputs)
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
