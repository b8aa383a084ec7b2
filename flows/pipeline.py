"""The `pipeline` flow: walks the stage graph of seqlm/stages.py as Prefect tasks.

Each stage is cached on what it reads (its params, the contents of its deps, its code), the
same inputs DVC hashes, so a re-run skips unchanged stages; a stage whose outputs were deleted
runs again. At the end dvc.lock is updated to describe exactly the artifacts written
(`dvc commit`) and they are pushed to the DVC remote.
"""
from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_client, get_run_logger
from prefect.futures import PrefectFuture

from seqlm.params import PARAMS_FILE, Params, load_params
from seqlm.stage_logging import StageLogger
from seqlm.stages import STAGES, Stage
from seqlm.tracking import Tracker, TrackingError, tracking_uri
from tasks import stage_task

StageKey = tuple[str, str | None]


def content_digest(path: Path) -> str:
    """sha256 over a file, or over every file of a folder with its relative path."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if file.name.startswith("."):  # temporary files of an interrupted atomic write
            continue
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
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


def _outputs_present(stage: Stage, item: str | None, params: Params) -> bool:
    return all(Path(p).exists() for p in _written(stage, item, params))


def submit_stage(stage: Stage, item: str | None, params: Params, stage_logger: StageLogger,
                 wait_for: list[PrefectFuture]) -> PrefectFuture:
    task = stage_task(stage.name, params).with_options(
        name=f"{stage.name}[{item}]" if item else stage.name,
        # Prefect computes the key when the task starts, after its upstream stages finished.
        cache_key_fn=lambda _ctx, _args: stage_cache_key(stage, item, params),
        persist_result=True,
        refresh_cache=not _outputs_present(stage, item, params),
    )
    kwargs = stage_logger.task_kwargs(stage.name, item)
    args = (params, item) if item is not None else (params,)
    return task.submit(*args, wait_for=wait_for, **kwargs)


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
    """Training tasks carry the tag `gpu`: one at a time per GPU, and one at a time on the CPU,
    where two trainings side by side would fight over the same cores."""
    import torch
    slots = max(1, torch.cuda.device_count())
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag="gpu", concurrency_limit=slots)
    return slots


@flow(name="pipeline", log_prints=True)
def pipeline(params_file: str = str(PARAMS_FILE), record_dvc: bool = True) -> dict[str, str]:
    """Run every stage whose inputs changed; returns {stage: final state name}."""
    logger = get_run_logger()
    params = load_params(params_file)
    logger.info("training tasks limited to %d at a time (tag 'gpu')", limit_training_slots())
    tracker = Tracker(params)
    tracker.start()
    stage_logger = StageLogger(tracker, params)

    futures: dict[StageKey, PrefectFuture] = {}
    for stage in STAGES:
        for item in stage.items(params):
            wait_for = [futures[key] for key in upstream(stage, item, params)]
            futures[(stage.name, item)] = submit_stage(stage, item, params, stage_logger, wait_for)

    states: dict[str, str] = {}
    try:
        for (name, item), future in futures.items():  # submission order is topological
            paths = future.result()
            label = f"{name}[{item}]" if item else name
            states[label] = future.state.name
            if future.state.name == "Cached":
                logger.info("stage %s unchanged: skipped (cached)", label)
            stage_logger.after(name, item, paths, cached=future.state.name == "Cached")
    except BaseException:
        tracker.finish("FAILED")
        raise
    if record_dvc:
        dvc_record(logger)
    tracker.finish("FINISHED")
    if tracker.error:
        raise TrackingError(
            f"MLflow store {tracking_uri()!r} failed ({tracker.error}); all pipeline artifacts "
            "were written. Fix MLFLOW_TRACKING_URI (unset it to use sqlite:///mlflow.db in the "
            "repository root, or point it at a running `mlflow server`) and re-run: unchanged "
            "stages are skipped.")
    return states
