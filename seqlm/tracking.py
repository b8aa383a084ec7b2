"""MLflow logging for one pipeline run: a parent run, one nested run per trained model.

A tracking store that fails never stops the pipeline: the artifacts are still written, the
first error is remembered, and the flow reports it at the end with how to fix the URI.
Every call names its run explicitly (MlflowClient), because Prefect runs tasks in worker
threads and MLflow's active run is thread-local.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from seqlm.io import file_digest
from seqlm.params import Params

DEFAULT_URI = "sqlite:///mlflow.db"
# Validation perplexity of a (model, vocabulary) on the current run's validation text.
Rescore = Callable[[Any, Any], float]
log = logging.getLogger(__name__)


class TrackingError(RuntimeError):
    """The MLflow store could not be used; the pipeline's own artifacts are intact."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


FIX_URI = ("Fix MLFLOW_TRACKING_URI (unset it to use sqlite:///mlflow.db in the repository root, "
           "or point it at a running `mlflow server`)")


def check_store(uri: str | None = None) -> None:
    """Fail in seconds, before any stage runs, when the tracking store cannot be used: a server
    that does not answer its health check, or a SQLite file in a folder that does not exist."""
    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        import httpx
        try:
            httpx.get(f"{uri.rstrip('/')}/health", timeout=5).raise_for_status()
        except httpx.HTTPError as exc:
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise TrackingError(f"MLflow store {uri!r} does not answer ({reason}). {FIX_URI}.") \
                from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow store {uri!r}: {folder} is not a writable folder. "
                                f"{FIX_URI}.")


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _guarded(method: Callable) -> Callable:
    """Run an MLflow call; on failure remember the first error and stop tracking."""
    @functools.wraps(method)
    def wrapper(self: "Tracker", *args: Any, **kwargs: Any) -> Any:
        if self.error is not None:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any store failure must not stop training
            self.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            log.error("MLflow tracking disabled for this run: %s", self.error)
            return None
    return wrapper


class _SystemMetrics(SystemMetricsMonitor):
    """MLflow's monitor publishes only after a full sampling interval, so a run that ends
    sooner (a short training, a stage of a second) kept an empty System metrics tab. This one
    publishes what it sampled when it is finished before its first interval."""

    published = False

    def publish_metrics(self, metrics: dict) -> None:
        super().publish_metrics(metrics)
        self.published = True

    def finish(self) -> None:
        started = self._process is not None
        super().finish()
        if started and not self.published:
            try:
                self.collect_metrics()
                self.publish_metrics(self.aggregate_metrics())
                self.mlflow_logger.flush()
            except Exception as exc:  # noqa: BLE001 - as MLflow's own loop: never fail a stage
                log.warning("System metrics of run %s not logged: %s", self._run_id, exc)


class Tracker:
    def __init__(self, params: Params, uri: str | None = None,
                 on_open: Callable[[str], None] | None = None) -> None:
        self.params = params
        self.on_open = on_open             # told the id of every run opened (to close it later)
        self.uri = uri or tracking_uri()
        self.client: MlflowClient | None = None   # made in start(): creating it can fail too
        self.error: str | None = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None

    # ---- parent run -------------------------------------------------------------------------
    @_guarded
    def start(self, run_name: str | None = None, tags: dict[str, str] | None = None) -> str:
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        name = self.params.tracking.experiment
        experiment = self.client.get_experiment_by_name(name)
        self.experiment_id = (experiment.experiment_id if experiment
                              else self.client.create_experiment(name))
        # Without this tag MLflow opens the experiment on its GenAI overview, not on the runs.
        self.client.set_experiment_tag(self.experiment_id, "mlflow.experimentKind",
                                       "custom_model_development")
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={
            "git_commit": git_commit(), "params_hash": self.params.digest(),
            "mlflow.source.type": "JOB", **(tags or {})})
        self.run_id = run.info.run_id
        self._opened(self.run_id)
        self._log_params(self.run_id, flatten(self.params.model_dump(mode="json")))
        return self.run_id

    @_guarded
    def finish(self, status: str = "FINISHED", lock_file: Path = Path("dvc.lock")) -> None:
        if self.run_id is None:
            return
        if lock_file.exists():            # the DVC hashes of every dep and out, in one file
            self.client.log_artifact(self.run_id, str(lock_file))
            self.client.set_tag(self.run_id, "dvc_lock_md5", file_digest(lock_file, "md5"))
        self.client.set_terminated(self.run_id, status)

    def run_url(self, run_id: str | None = None) -> str | None:
        """Where the run is in the MLflow UI (`mlflow ui` on its default port for a local
        store)."""
        run_id = run_id or self.run_id
        if run_id is None:
            return None
        base = self.uri if self.uri.startswith(("http://", "https://")) else \
            "http://127.0.0.1:5000"
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"

    # ---- nested runs -------------------------------------------------------------------------
    @_guarded
    def child_run(self, name: str, params: dict[str, Any]) -> str | None:
        if self.run_id is None:
            return None
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            "mlflow.parentRunId": self.run_id, "git_commit": git_commit(),
            "params_hash": self.params.digest()})
        self._opened(run.info.run_id)
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def _opened(self, run_id: str) -> None:
        if self.on_open is not None:
            self.on_open(run_id)

    def epoch_logger(self, run_id: str | None) -> Callable[[int, dict[str, float]], None]:
        """Callback for the training loops: metrics of each epoch, step = epoch."""
        @_guarded
        def log_epoch(self: Tracker, epoch: int, metrics: dict[str, float]) -> None:
            if run_id is not None:
                self.log_metrics(run_id, metrics, step=epoch)
        return functools.partial(log_epoch, self)

    @_guarded
    def set_tags(self, run_id: str | None, tags: dict[str, str]) -> None:
        """Tags on run_id (None: the parent run)."""
        run_id = run_id or self.run_id
        if run_id is None:
            return
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def system_metrics(self, run_id: str):
        """CPU, memory (and GPU) usage sampled into the run's System metrics tab until
        `.finish()`."""
        # It says "started", "skip GPU", "stopping", "terminated" at INFO for every stage: four
        # lines per stage in the terminal that tell a person nothing; its warnings still show.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        monitor = _SystemMetrics(run_id, sampling_interval=1, samples_before_logging=1)
        monitor.start()
        return monitor

    @_guarded
    def log_dict(self, run_id: str | None, data: object, artifact_file: str) -> None:
        if run_id is not None:
            self.client.log_dict(run_id, data, artifact_file)

    @_guarded
    def version_with_weights(self, registered: str, weights_sha256: str):
        """The registered version holding exactly these weights, if any."""
        for version in self.client.search_model_versions(f"name='{registered}'"):
            if version.tags.get("weights_sha256") == weights_sha256:
                return version
        return None

    @_guarded
    def end_child(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id is not None:
            self.client.set_terminated(run_id, status)

    # ---- what each stage leaves behind -------------------------------------------------------
    @_guarded
    def log_metrics(self, run_id: str | None, metrics: dict[str, float], step: int = 0) -> None:
        self.log_steps(run_id, [(step, metrics, mlflow.utils.time.get_current_time_millis())])

    @_guarded
    def log_steps(self, run_id: str | None, steps: list[tuple[int, dict[str, float], int]],
                  ) -> None:
        """The metrics of many steps, each (step, metrics, timestamp in ms), in as few calls as
        MLflow takes (1000 values per batch): one store transaction each."""
        run_id = run_id or self.run_id
        if run_id is None:
            return
        batch = [Metric(k, float(v), ts, step) for step, metrics, ts in steps
                 for k, v in metrics.items() if isinstance(v, (int, float))]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[i:i + 1000], synchronous=True)

    @_guarded
    def log_metrics_file(self, path: Path | str, run_id: str | None = None) -> None:
        self.log_metrics(run_id, flatten(json.loads(Path(path).read_text())))

    @_guarded
    def log_artifacts(self, paths: list[Path | str], artifact_path: str | None = None,
                      run_id: str | None = None) -> None:
        run_id = run_id or self.run_id
        if run_id is None:
            return
        for path in map(Path, paths):
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else \
                [path] if path.exists() else []
            for file in files:
                inner = file.relative_to(path).parent if path.is_dir() else Path()
                if any(part.startswith(".") for part in (*inner.parts, file.name)):
                    continue              # .gitignore files and leftovers are not artifacts
                where = Path(artifact_path or "", path.name if path.is_dir() else "", inner)
                self.client.log_artifact(run_id, str(file), where.as_posix().strip(".") or None)

    @_guarded
    def log_png(self, run_id: str | None, data: bytes, artifact_file: str) -> None:
        """PNG bytes (seqlm.figures.png) as the run's artifact `artifact_file`."""
        if run_id is None:
            return
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder, artifact_file)
            path.write_bytes(data)
            self.client.log_artifact(run_id, str(path))

    @_guarded
    def log_dataset(self, frame: pd.DataFrame, source: str, name: str, context: str,
                    run_id: str | None = None, digest: str | None = None,
                    tags: dict[str, str] | None = None) -> None:
        run_id = run_id or self.run_id
        if run_id is None:
            return
        with warnings.catch_warnings():
            # A relative path is ambiguous to MLflow's source registry, and integer columns get a
            # hint about missing values; neither applies to these files.
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest)
            entity = dataset._to_mlflow_entity()
        input_tags = {"mlflow.data.context": context, **(tags or {})}
        self.client.log_inputs(run_id, datasets=[mlflow.entities.DatasetInput(
            entity, tags=[mlflow.entities.InputTag(k, v) for k, v in input_tags.items()])])

    @_guarded
    def log_language_model(self, run_id: str | None, model_dir: Path, model_name: str,
                           val_perplexity: float, val_digest: str, rescore: Rescore,
                           description: str = "") -> str | None:
        """Log the model (weights + vocabulary) as a pyfunc that generates text, register it and
        move the `champion` alias to it only if it beats the current champion on the same
        validation text (`val_digest`): a champion measured on other text (another corpus,
        split or version of the data) is scored on this one with `rescore` first. Returns the
        version."""
        if run_id is None:
            return None
        from seqlm.mlflow_model import log_char_lm
        registered = f"{self.params.corpus_name}-{model_name.replace('_', '-')}"
        weights = file_digest(model_dir / "model.pt")
        known = self.version_with_weights(registered, weights)
        if known is not None:                  # e.g. the same weights trained again
            return str(known.version)
        # log_model needs an active run; MLflow's active run is thread-local, and this is the
        # flow's thread, which has none of its own.
        with mlflow.start_run(run_id=run_id):
            info = log_char_lm(model_dir, registered, model_name)
        version = str(info.registered_model_version)
        self.client.update_registered_model(registered, description=(
            f"Character-level {model_name} language model of the {self.params.corpus_name} "
            "corpus (Dive into Deep Learning, chapter 8), trained by the seqlm pipeline. Each "
            "version holds the weights of its best-validation epoch; the alias `champion` is "
            "the version with the lowest validation perplexity on the same validation text."))
        if description:
            self.client.update_model_version(registered, version, description=description)
        self.client.set_model_version_tag(registered, version, "weights_sha256", weights)
        # repr round-trips exactly: an equal model never takes the alias from the champion.
        self.client.set_model_version_tag(registered, version, "val_perplexity",
                                          repr(float(val_perplexity)))
        self.client.set_model_version_tag(registered, version, "val_digest", val_digest)
        champion = self._champion_perplexity(registered, val_digest, rescore)
        if champion is None or val_perplexity < champion:
            self.client.set_registered_model_alias(registered, "champion", version)
            log.info("%s v%s is the new champion (val perplexity %.3f, %s)", registered,
                     version, val_perplexity,
                     "the first" if champion is None else f"was {champion:.3f}")
        else:
            log.info("%s v%s (val perplexity %.3f) does not beat the champion (%.3f): alias "
                     "kept", registered, version, val_perplexity, champion)
        return version

    def _champion_perplexity(self, registered: str, val_digest: str, rescore: Rescore,
                             ) -> float | None:
        """The champion's validation perplexity on the text of `val_digest`; None when there is
        no champion."""
        try:
            current = self.client.get_model_version_by_alias(registered, "champion")
        except mlflow.exceptions.MlflowException:
            return None
        value = current.tags.get("val_perplexity")
        if value is not None and current.tags.get("val_digest") == val_digest:
            return float(value)
        loaded = mlflow.pyfunc.load_model(f"models:/{registered}/{current.version}")
        champion = loaded.unwrap_python_model()
        score = rescore(champion.model, champion.vocab)
        log.info("%s champion v%s was measured on other validation text; on this run's it "
                 "scores %.3f", registered, current.version, score)
        return score

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                 for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100], synchronous=True)
