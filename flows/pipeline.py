"""The `pipeline` flow: walks the stage graph of seqlm/stages.py as Prefect tasks.

Each stage is cached on what it reads (its params, the contents of its deps, its code), the
same inputs DVC hashes, so a re-run skips unchanged stages; a stage whose outputs were deleted
runs again. At the end dvc.lock is updated to describe exactly the artifacts written
(`dvc commit`) and they are pushed to the DVC remote.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_client, get_run_logger
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectNotFound
from prefect.futures import PrefectFuture

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
    paths = stage.paths(params, item)
    return paths["outs"] + paths["metrics"] + paths["plots"]


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


def submit_stage(stage: Stage, item: str | None, params: Params, stage_logger: StageLogger,
                 record: StageRecord, tags: list[str]) -> tuple[PrefectFuture, str]:
    """Submit one stage whose upstream stages have finished, so its inputs are final."""
    key = stage_cache_key(stage, item, params)
    task = stage_task(stage.name, params).with_options(
        name=_label(stage.name, item),
        cache_key_fn=lambda _ctx, _args: key,
        persist_result=True,
        refresh_cache=(fetches_every_run(stage, params) or
                       not record.is_current(_label(stage.name, item), key,
                                             outputs_digest(stage, item, params))),
        tags=tags,
    )
    kwargs = stage_logger.task_kwargs(stage.name, item)
    args = (params, item) if item is not None else (params,)
    return task.submit(*args, **kwargs), key


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


@flow(name="pipeline", log_prints=True)
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
    flow_run_id = str(FlowRunContext.get().flow_run.id)
    tag = open_training_slots(flow_run_id)
    run.set(flow_run_id=flow_run_id, server_pid=server.started_pid, concurrency_tag=tag,
            mlflow_uri=tracking_uri())
    tracker = Tracker(params, on_open=run.add_mlflow_run)
    tracker.start()
    stage_logger = StageLogger(tracker, params)

    record = StageRecord()
    futures: dict[StageKey, tuple[PrefectFuture, str]] = {}
    states: dict[str, str] = {}
    try:
        corpus_checked = False
        for stage in STAGES:
            if stage.name not in ("download", "preprocess") and not corpus_checked:
                # Everything that needs the corpus's size fails now, before any later stage.
                futures[("preprocess", None)][0].result()
                check_preprocessed(params)
                corpus_checked = True
            trainings = [i for i in stage.items(params)] if stage.name == "train_lm" else []
            if len(trainings) > TRAINING_SLOTS:
                logger.info("%d trainings, %d at a time on this device: %s wait for a slot",
                            len(trainings), TRAINING_SLOTS,
                            ", ".join(_label(stage.name, i) for i in trainings[TRAINING_SLOTS:]))
            for item in stage.items(params):
                for key in upstream(stage, item, params):
                    futures[key][0].result()  # inputs final before this stage's key is taken
                futures[(stage.name, item)] = submit_stage(
                    stage, item, params, stage_logger, record,
                    tags=[tag] if stage.name == "train_lm" else [])
        for (name, item), (future, key) in futures.items():  # in topological order
            paths = future.result()
            label = _label(name, item)
            states[label] = future.state.name
            stage = STAGE_BY_NAME[name]
            record.update(label, key, outputs_digest(stage, item, params))
            if future.state.name == "Cached":
                logger.info("stage %s unchanged: skipped (cached)", label)
            stage_logger.after(name, item, paths, cached=future.state.name == "Cached")
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
        close_training_slots(tag)
        run.finish()
        raise
    tracker.finish("FINISHED")
    close_training_slots(tag)
    run.finish()
    if tracker.error:
        raise TrackingError(
            f"MLflow store {tracking_uri()!r} failed ({tracker.error}); all pipeline artifacts "
            f"were written. {FIX_URI} and re-run: unchanged stages are skipped.")
    return states
