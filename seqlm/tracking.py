"""MLflow, the project's way: names, tags, runs, datasets and the registry, in one module.

One parent run per pipeline run (opened by the flow) and one nested run per training (opened and
closed by the training's own task, wherever it runs: a thread, a Prefect worker, a Dask worker;
`seqlm stage` opens it without a parent). A store that fails never stops a stage: its artifacts
are written, the run remembers the first error (`Run.error`), and the flow reports it at the end
with how to fix the URI. Every call names its run (MlflowClient): MLflow's active run is
thread-local, and tasks run in worker threads.
"""
from __future__ import annotations

import contextlib
import functools
import getpass
import json
import logging
import os
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from seqlm.io import file_digest
from seqlm.params import CHAMPION_MIN_VAL_TOKENS, Params

# MLflow reads these when it makes a request: a tracking server that stops answering mid-run
# fails in seconds, not after minutes of retries; artifact downloads draw no progress bars.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow's warnings reach the terminal and the run logs in Prefect's format (prefect.toml lists
# `mlflow` among its extra loggers), not in a second format of MLflow's own handler.
os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")

DEFAULT_URI = "sqlite:///mlflow.db"
CHAMPION = "champion"
CLEAN_TAG = "clean"          # a version's preprocess.clean: champions compare within one only
PIPELINE_TAG = {"seqlm.run": "pipeline"}     # marks a pipeline's parent run
# Epoch metrics are sent at most this often (and when the run ends): one store transaction for a
# few epochs instead of one per epoch, which took several ms of the training thread each.
EPOCHS_SENT_EVERY_S = 2.0
# Validation perplexity of a (model, vocabulary) on the current run's validation text.
Rescore = Callable[[Any, Any], float]
log = logging.getLogger(__name__)


class TrackingError(RuntimeError):
    """The MLflow store could not be used; the pipeline's own artifacts are intact."""


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or the workspace's own store, by its absolute path (MLflow keeps one
    store per URI in a process: a relative one would stay that of the first folder)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(DEFAULT_URI.removeprefix('sqlite:///')).resolve()}"


# MLflow 3.17's UI shows an experiment in its GenAI view (traces, no runs table, no registry)
# unless the browser once chose otherwise (kept in its local storage); this query parameter opens
# the model-training view in any browser.
TRAINING_VIEW = "workflowType=machine_learning"
UI_PORT = 5000          # `mlflow ui`'s default, and `seqlm ui`'s


def ui_url(uri: str, route: str = "") -> str:
    """Page `route` (`experiments/1`, `models/<name>`) of the MLflow UI of store `uri`, in the
    model-training view: the server itself for an http store, else `seqlm ui` / `mlflow ui` on
    this machine."""
    base = uri if uri.startswith(("http://", "https://")) else f"http://127.0.0.1:{UI_PORT}"
    return f"{base.rstrip('/')}/#/{route}?{TRAINING_VIEW}"


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


def open_store(uri: str | None = None) -> None:
    """Import MLflow and open the store (a new SQLite store gets its tables): the seconds the
    first MLflow call of a run takes, which `seqlm run` spends while the temporary Prefect
    server boots instead of in the flow. MLflow keeps the store for the process."""
    from mlflow import MlflowClient
    MlflowClient(uri or tracking_uri()).search_experiments(max_results=1)


@functools.cache
def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def source_tags(params: Params, entry: str) -> dict[str, str]:
    """The system tags MLflow's UI fills its Source, User and Version columns from (only
    `mlflow.start_run()` sets them itself, from sys.argv[0]: under a Prefect worker that is
    Prefect's engine), and the project's own."""
    commit = git_commit()
    return {"mlflow.source.name": entry, "mlflow.source.type": "JOB",
            "mlflow.user": getpass.getuser(),
            **({"mlflow.source.git.commit": commit.removesuffix("-dirty")}
               if commit != "unknown" else {}),
            "git_commit": commit, "params_hash": params.digest()}


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def where() -> str:
    """Where this code runs: the Dask worker's address, or this host's name."""
    try:
        from distributed import get_worker
        return get_worker().address
    except (ImportError, ValueError):
        return socket.gethostname()


# `seqlm stage`'s own id for the MLflow runs it opens (what the flow run id is for a pipeline
# run): a killed `seqlm stage` (under `dvc repro`) leaves it in its run record, and the next run
# closes those runs by it.
STAGE_RUN_TAG = "seqlm.stage_run"
stage_run: str | None = None


def flow_run_id() -> str | None:
    """The Prefect flow run the calling task belongs to (None outside one)."""
    from prefect.context import FlowRunContext, TaskRunContext
    task_run = TaskRunContext.get()
    if task_run is not None and task_run.task_run.flow_run_id is not None:
        return str(task_run.task_run.flow_run_id)
    flow_run = FlowRunContext.get()
    return str(flow_run.flow_run.id) if flow_run is not None and flow_run.flow_run else None


def registered_name(params: Params, model: str) -> str:
    """The registry's name of a language model: it follows the corpus (`timemachine-rnn`)."""
    return f"{params.corpus_name}-{model.replace('_', '-')}"


def _guarded(method: Callable) -> Callable:
    """Run an MLflow call; on failure remember the first error and stop tracking this run."""
    @functools.wraps(method)
    def wrapper(self: "Run", *args: Any, **kwargs: Any) -> Any:
        if self.error is not None:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any store failure must not stop a stage
            self.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            log.error("MLflow tracking disabled for run %s: %s", self.name, self.error)
            return None
    return wrapper


class Run:
    """One MLflow run. Every call is guarded: after the first failure it does nothing."""

    def __init__(self, params: Params, name: str, uri: str | None = None) -> None:
        self.params, self.name = params, name
        self.uri = uri or tracking_uri()
        self.error: str | None = None
        self.client = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.champion: dict[str, Any] | None = None   # the registry's decision on its model
        self._unsent: list[tuple[int, dict[str, float], int]] = []
        self._sent_at = 0.0
        self._lock = threading.Lock()

    @_guarded
    def open(self, tags: dict[str, str], nest_in: str | None = None) -> str:
        """Create the run; nested in the parent run of Prefect flow run `nest_in`, if any."""
        from mlflow import MlflowClient
        self.client = MlflowClient(self.uri, registry_uri=self.uri)
        experiment = self.client.get_experiment_by_name(self.params.tracking.experiment)
        if experiment is None:
            from seqlm.relative_artifacts import experiment_location
            name = self.params.tracking.experiment
            # A local store's artifacts lie beside it, addressed relative to it (the clone can
            # move); a tracking server keeps them where it was told to (--artifacts-destination).
            remote = self.uri.startswith(("http://", "https://"))
            self.experiment_id = self.client.create_experiment(
                name, artifact_location=None if remote else experiment_location(name))
            # Without this tag MLflow opens the experiment on its GenAI overview.
            self.client.set_experiment_tag(self.experiment_id, "mlflow.experimentKind",
                                           "custom_model_development")
        else:
            self.experiment_id = experiment.experiment_id
        parent = self._pipeline_run(nest_in) if nest_in else None
        run = self.client.create_run(self.experiment_id, run_name=self.name, tags={
            **tags, **({"mlflow.parentRunId": parent} if parent else {})})
        self.run_id = run.info.run_id
        return self.run_id

    def _pipeline_run(self, flow_run: str) -> str | None:
        """The parent run the pipeline opened for Prefect flow run `flow_run`."""
        key, value = next(iter(PIPELINE_TAG.items()))
        found = self.client.search_runs(
            [self.experiment_id], max_results=1,
            filter_string=f"tags.`prefect.flow_run_id` = '{flow_run}' and "
                          f"tags.`{key}` = '{value}'")
        return found[0].info.run_id if found else None

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with `status`; tried even after an earlier call failed, so that a store
        that failed once does not leave the run RUNNING (a run it cannot end is ended by the
        next pipeline run)."""
        if self.run_id is None:
            return
        self._send_epochs()
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as exc:  # noqa: BLE001 - as every call here: never fail a stage
            self.error = self.error or f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"

    def url(self) -> str | None:
        """The run in the MLflow UI (see `ui_url`)."""
        if self.run_id is None:
            return None
        return ui_url(self.uri, f"experiments/{self.experiment_id}/runs/{self.run_id}")

    @_guarded
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                 for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100], synchronous=True)

    @_guarded
    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.utils.time import get_current_time_millis
        self.log_steps([(step, metrics, get_current_time_millis())])

    @_guarded
    def log_steps(self, steps: list[tuple[int, dict[str, float], int]]) -> None:
        """The metrics of many steps, each (step, metrics, timestamp in ms), in as few calls as
        MLflow takes (1000 values per batch): one store transaction each."""
        from mlflow.entities import Metric
        batch = [Metric(k, float(v), ts, step) for step, metrics, ts in steps
                 for k, v in metrics.items() if isinstance(v, (int, float))]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000], synchronous=True)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """One epoch's metrics (step = epoch), sent with the others every EPOCHS_SENT_EVERY_S."""
        from mlflow.utils.time import get_current_time_millis
        with self._lock:
            self._unsent.append((epoch, metrics, get_current_time_millis()))
            due = time.monotonic() - self._sent_at >= EPOCHS_SENT_EVERY_S
        if due:
            self._send_epochs()

    def _send_epochs(self) -> None:
        with self._lock:
            steps, self._unsent = self._unsent, []
            self._sent_at = time.monotonic()
        if steps:
            self.log_steps(steps)

    @_guarded
    def log_artifacts(self, paths: list[str], artifact_path: str | None = None) -> None:
        """Files, and folders under their own name; dot files (leftovers) are left out."""
        for path in map(Path, paths):
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else \
                [path] if path.exists() else []
            for file in files:
                inner = file.relative_to(path).parent if path.is_dir() else Path()
                if any(part.startswith(".") for part in (*inner.parts, file.name)):
                    continue
                where_ = Path(artifact_path or "", path.name if path.is_dir() else "", inner)
                self.client.log_artifact(self.run_id, str(file), where_.as_posix().strip(".") or None)

    @_guarded
    def log_dict(self, data: object, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    @_guarded
    def log_png(self, data: bytes, artifact_file: str) -> None:
        """PNG bytes (seqlm.figures.png) as the run's artifact `artifact_file`."""
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder, artifact_file)
            path.write_bytes(data)
            self.client.log_artifact(self.run_id, str(path))

    @_guarded
    def log_dataset(self, name: str, source: str, digest: str, context: str,
                    tags: dict[str, str] | None = None) -> None:
        """A dataset by name, source and digest, without reading its data again."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        with warnings.catch_warnings():
            # A relative path is ambiguous to MLflow's source registry; a local file it is.
            warnings.simplefilter("ignore", UserWarning)
            entity = MetaDataset(resolve_dataset_source(source), name=name,
                                 digest=digest[:16])._to_mlflow_entity()
        input_tags = {"mlflow.data.context": context, **(tags or {})}
        dataset = DatasetInput(entity, tags=[InputTag(k, v) for k, v in input_tags.items()])
        try:
            self.client.log_inputs(self.run_id, datasets=[dataset])
        except Exception:  # noqa: BLE001 - see below; a second failure is the store's
            # Trainings side by side log the same dataset at once, and the store's "get or
            # create" of a dataset races (a UNIQUE constraint fails): the second try finds it.
            self.client.log_inputs(self.run_id, datasets=[dataset])


# MLflow's own default: every sample is a write to the store (a SQLite commit), and a long
# training sampled every second filled its System metrics with thousands of rows an hour.
SAMPLING_INTERVAL_S = 10


@contextlib.contextmanager
def system_metrics(run: Run) -> Iterator[None]:
    """CPU, memory (and GPU) usage sampled into the run's System metrics tab meanwhile."""
    if run.run_id is None:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class Monitor(SystemMetricsMonitor):
        """MLflow's monitor publishes only after a full sampling interval, so a run that ends
        sooner (a short training) kept an empty System metrics tab: this one then publishes
        what it sampled."""
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
                except Exception as exc:  # noqa: BLE001 - as MLflow's own loop: never fail
                    log.warning("System metrics of run %s not logged: %s", self._run_id, exc)

    # It says "started", "skip GPU", "stopping", "terminated" at INFO for every run: lines that
    # tell a person nothing; its warnings still show.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = Monitor(run.run_id, sampling_interval=SAMPLING_INTERVAL_S, samples_before_logging=1,
                      tracking_uri=run.uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


@contextlib.contextmanager
def training_run(params: Params, name: str, section: dict[str, Any]) -> Iterator[Run]:
    """The run of one training, open while it trains: FINISHED when the block ends, KILLED when
    it is interrupted, FAILED when it raises. Nested in the pipeline's run when a pipeline flow
    runs the training; a run of its own under `seqlm stage` (`dvc repro`)."""
    from seqlm.interrupt import Interrupted
    run = Run(params, name)
    flow_run = flow_run_id()
    owner = {"prefect.flow_run_id": flow_run} if flow_run else \
        {STAGE_RUN_TAG: stage_run} if stage_run else {}
    run.open({**source_tags(params, "pipeline" if flow_run else "seqlm stage"),
              "worker": where(), **owner}, nest_in=flow_run)
    run.log_params(section)
    try:
        with system_metrics(run):
            yield run
    except (KeyboardInterrupt, Interrupted):
        run.finish("KILLED")
        raise
    except BaseException:
        run.finish("FAILED")
        raise
    run.finish()


def register_language_model(run: Run, model_dir: Path, model: str, val_perplexity: float,
                            val_digest: str, rescore: Rescore, description: str) -> str | None:
    """Log the model (weights + vocabulary) in `run` as a pyfunc that generates text, register
    it as `<corpus>-<model>` and move the alias `champion` to it only if it beats the current
    champion on the same validation text (`val_digest`): a champion measured on other text
    (another corpus, split or version of the data) is scored on this one with `rescore` first.
    The same weights registered before are not registered again. Returns the version."""
    return _register(run, model_dir, model, val_perplexity, val_digest, rescore, description)


@_guarded
def _register(run: Run, model_dir: Path, model: str, val_perplexity: float, val_digest: str,
              rescore: Rescore, description: str) -> str | None:
    import mlflow
    from seqlm.mlflow_model import log_char_lm
    if run.run_id is None:
        return None
    client, name = run.client, registered_name(run.params, model)
    weights = file_digest(model_dir / "model.pt")
    for version in client.search_model_versions(f"name='{name}'"):
        if version.tags.get("weights_sha256") == weights:
            return str(version.version)
    # log_model needs an active run (MLflow's active run is thread-local) of the global store,
    # and a new version finds its logged model there too.
    with fluent_store(run.uri):
        with mlflow.start_run(run_id=run.run_id):
            info = log_char_lm(model_dir, model)
        # Registered by the client, not by log_model: that prints its own lines to stderr,
        # outside the log's format.
        try:
            client.create_registered_model(name)
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = str(client.create_model_version(name, info.model_uri, run_id=run.run_id,
                                                   model_id=info.model_id).version)
    client.update_registered_model(name, description=(
        f"Character-level {model} language model of the {run.params.corpus_name} corpus (Dive "
        "into Deep Learning, chapter 8), trained by the seqlm pipeline. Each version holds the "
        "weights of its best-validation epoch; the alias `champion` is the version with the "
        "lowest validation perplexity on the same validation text. The runs: experiment "
        f"[{run.params.tracking.experiment}]({ui_url(run.uri, f'experiments/{run.experiment_id}')})."))
    client.update_model_version(name, version, description=(
        f"{description}\n\nTrained in MLflow run [{run.name}]({run.url()})."))
    client.set_model_version_tag(name, version, "weights_sha256", weights)
    # repr round-trips exactly: an equal model never takes the alias from the champion.
    client.set_model_version_tag(name, version, "val_perplexity", repr(float(val_perplexity)))
    client.set_model_version_tag(name, version, "val_digest", val_digest)
    clean = run.params.preprocess.clean
    client.set_model_version_tag(name, version, CLEAN_TAG, clean)
    val_tokens = run.params.preprocess.val_tokens
    # The decision, for the champion's event (seqlm.runtime.news): the versions and the
    # validation perplexities before and after, and the text they were measured on.
    decision = {"name": name, "model": model, "version": version,
                "val_perplexity": float(val_perplexity),
                "validation_text": {"digest": val_digest, "tokens": val_tokens,
                                    "corpus": run.params.corpus_name},
                "mlflow_run": run.url()}
    if val_tokens < CHAMPION_MIN_VAL_TOKENS:
        reason = (f"its validation text has {val_tokens} tokens, fewer than the "
                  f"{CHAMPION_MIN_VAL_TOKENS} a comparison needs (preprocess.val_tokens)")
        log.info("%s v%s is registered but cannot be champion: %s", name, version, reason)
        run.champion = {**decision, "moved": False, "reason": reason, **_current(client, name)}
        return version
    other = _champion_clean(client, name)
    if other not in (None, clean):
        reason = (f"the champion reads text cleaned {other!r}, this model text cleaned "
                  f"{clean!r} (preprocess.clean)")
        log.warning("%s v%s is registered but cannot be champion: %s; set tracking.corpus_name "
                    "to register it under a name of its own", name, version, reason)
        run.champion = {**decision, "moved": False, "reason": reason, **_current(client, name)}
        return version
    champion = _champion_perplexity(client, name, val_digest, rescore)
    before = {"champion_version": champion[0], "champion_val_perplexity": champion[1]} \
        if champion else {"champion_version": None, "champion_val_perplexity": None}
    if champion is None or val_perplexity < champion[1]:
        client.set_registered_model_alias(name, CHAMPION, version)
        reason = "the first" if champion is None else f"was {champion[1]:.3f}"
        log.info("%s v%s is the new champion (val perplexity %.3f, %s)", name, version,
                 val_perplexity, reason)
        run.champion = {**decision, **before, "moved": True,
                        "reason": f"better on the same validation text ({reason})"}
    else:
        log.info("%s v%s (val perplexity %.3f) does not beat the champion (%.3f): alias kept",
                 name, version, val_perplexity, champion[1])
        run.champion = {**decision, **before, "moved": False,
                        "reason": f"does not beat champion v{champion[0]} "
                                  f"({champion[1]:.3f}) on the same validation text"}
    return version


def _current(client: Any, name: str) -> dict[str, Any]:
    """The champion as it stays: its version and its recorded validation perplexity."""
    import mlflow
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return {"champion_version": None, "champion_val_perplexity": None}
    value = current.tags.get("val_perplexity")
    return {"champion_version": str(current.version),
            "champion_val_perplexity": float(value) if value is not None else None}


@contextlib.contextmanager
def fluent_store(uri: str) -> Iterator[None]:
    """MLflow's fluent API (`mlflow.start_run`, `log_model`, `pyfunc.load_model`) on store `uri`
    meanwhile. Through MLFLOW_TRACKING_URI, put back after: `mlflow.set_tracking_uri` would
    leave the store set for the rest of the process (and in MLFLOW_TRACKING_URI)."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def _champion_clean(client: Any, name: str) -> str | None:
    """The `preprocess.clean` of the champion's text (versions registered before the setting
    existed read the chapter's), None without a champion."""
    import mlflow
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None
    return current.tags.get(CLEAN_TAG, "letters")


def _champion_perplexity(client: Any, name: str, val_digest: str, rescore: Rescore,
                         ) -> tuple[str, float] | None:
    """The champion's version and validation perplexity on the text of `val_digest`; None
    without one."""
    import mlflow
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None
    value = current.tags.get("val_perplexity")
    if value is not None and current.tags.get("val_digest") == val_digest:
        return str(current.version), float(value)
    # Its weights and vocabulary only, read as data (torch.load with weights_only): loading the
    # pyfunc would run the Python code stored beside them, which anyone who can write the store
    # could have replaced.
    import yaml
    from mlflow.artifacts import download_artifacts

    from seqlm.generate import load_trained
    with tempfile.TemporaryDirectory(prefix="seqlm-champion-") as tmp, \
            fluent_store(client.tracking_uri):
        root = Path(download_artifacts(artifact_uri=f"models:/{name}/{current.version}",
                                       dst_path=tmp)).resolve()
        flavor = yaml.safe_load((root / "MLmodel").read_text())["flavors"]["python_function"]
        model_dir = (root / flavor["artifacts"]["model_dir"]["path"]).resolve()
        if not model_dir.is_relative_to(root):
            raise ValueError(f"models:/{name}/{current.version}: its model_dir {model_dir} lies "
                             f"outside the model")
        model, vocab, _ = load_trained(model_dir)
    score = rescore(model, vocab)
    log.info("%s champion v%s was measured on other validation text; on this run's it scores "
             "%.3f", name, current.version, score)
    return str(current.version), score


def log_record(run: Run, record: dict[str, Any], cached: bool) -> None:
    """What a stage returned, into the pipeline's run: its metrics and datasets always, its
    artifacts when it ran (a cached stage's are in the run that made them)."""
    for dataset in record.get("datasets", []):
        run.log_dataset(**dataset)
    if record.get("metrics"):
        run.log_metrics(record["metrics"])
    if not cached:
        for artifact_path, paths in record.get("artifacts", {}).items():
            run.log_artifacts(paths, artifact_path or None)


def log_lock(run: Run, lock: Path = Path("dvc.lock")) -> None:
    """dvc.lock (the DVC hashes of every dep and out, in one file) and its md5 on the run."""
    if lock.exists():
        run.log_artifacts([str(lock)])
        run.set_tags({"dvc_lock_md5": file_digest(lock, "md5")})


def close_runs_of(tag: str, owner: str, uri: str, reason: str) -> list[str]:
    """Close, as FAILED with the reason, the MLflow runs that a Prefect flow run or a `seqlm
    stage` (`tag` = `owner`: their id) left RUNNING (its process was killed, or the store failed
    before they could be closed). Returns their names."""
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    closed = []
    for run in client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string=f"tags.`{tag}` = '{owner}' and attributes.status = 'RUNNING'"):
        client.set_tag(run.info.run_id, "failure_reason", reason)
        client.set_terminated(run.info.run_id, "FAILED")
        closed.append(run.info.run_name)
    return closed
