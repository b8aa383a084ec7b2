"""The `pipeline` flow: walks the stage graph of seqlm/stages.py as Prefect tasks.

Each stage is cached on what it reads (its params, the contents of its deps, its code), the
same inputs DVC hashes, so a re-run skips unchanged stages; a stage whose outputs were deleted
runs again. At the end dvc.lock is updated to describe exactly the artifacts written
(`dvc commit`) and they are pushed to the DVC remote.
"""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_client, get_run_logger
from prefect.futures import PrefectFuture

from seqlm.io import file_digest, write_json
from seqlm.params import PARAMS_FILE, Params, load_params
from seqlm.stage_logging import StageLogger
from seqlm.stages import STAGE_BY_NAME, STAGES, Stage
from seqlm.tracking import Tracker, TrackingError, tracking_uri
from tasks import stage_task

StageKey = tuple[str, str | None]
STAGE_RECORD = Path(".stage-record.json")   # per workspace, like checkpoints/ (git-ignored)


def content_digest(path: Path) -> str:
    """sha256 over a file, or over every file of a folder with its relative path."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if file.name.startswith("."):  # temporary files of an interrupted atomic write
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
                 record: StageRecord) -> tuple[PrefectFuture, str]:
    """Submit one stage whose upstream stages have finished, so its inputs are final."""
    key = stage_cache_key(stage, item, params)
    task = stage_task(stage.name, params).with_options(
        name=_label(stage.name, item),
        cache_key_fn=lambda _ctx, _args: key,
        persist_result=True,
        refresh_cache=(fetches_every_run(stage, params) or
                       not record.is_current(_label(stage.name, item), key,
                                             outputs_digest(stage, item, params))),
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


def limit_training_slots() -> int:
    """Training tasks carry the tag `gpu` and take one slot: training uses one device (the CPU,
    or the first GPU), and two trainings side by side would only fight over it."""
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag="gpu", concurrency_limit=1)
    return 1


@flow(name="pipeline", log_prints=True)
def pipeline(params_file: str = str(PARAMS_FILE), record_dvc: bool = True) -> dict[str, str]:
    """Run every stage whose inputs changed; returns {stage: final state name}."""
    logger = get_run_logger()
    params = load_params(params_file)
    logger.info("training tasks limited to %d at a time (tag 'gpu')", limit_training_slots())
    tracker = Tracker(params)
    tracker.start()
    stage_logger = StageLogger(tracker, params)

    record = StageRecord()
    futures: dict[StageKey, tuple[PrefectFuture, str]] = {}
    states: dict[str, str] = {}
    try:
        for stage in STAGES:
            for item in stage.items(params):
                for key in upstream(stage, item, params):
                    futures[key][0].result()  # inputs final before this stage's key is taken
                futures[(stage.name, item)] = submit_stage(stage, item, params, stage_logger,
                                                           record)
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
            dvc_record(logger)
    except BaseException:
        stage_logger.end_runs("FAILED")
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    if tracker.error:
        raise TrackingError(
            f"MLflow store {tracking_uri()!r} failed ({tracker.error}); all pipeline artifacts "
            "were written. Fix MLFLOW_TRACKING_URI (unset it to use sqlite:///mlflow.db in the "
            "repository root, or point it at a running `mlflow server`) and re-run: unchanged "
            "stages are skipped.")
    return states
