"""One run per workspace, and cleaning up after a run that was killed.

`seqlm run`, `seqlm stage` and scheduled runs hold `.seqlm/lock`, an flock that the kernel
releases when the process ends, however it ends: a second run is refused at once with the
holder's PID (a run a deployment started waits for it instead: seqlm.runtime.session), and the
lock of a dead process is simply taken over. `seqlm run` also holds DVC's
repository lock (`.dvc/tmp/lock`), so a `dvc repro` started meanwhile fails at once instead of
deleting stage outputs before its command is refused.

`.seqlm/dvc-recorded.json` holds the digest of what the last `dvc commit` + `dvc push` of a run
made true (dvc.lock, the DVC config, every stage's inputs and outputs): a run that finds the same
skips both.

`.seqlm/run.json` records what the running pipeline owns (its MLflow runs, its Prefect flow run,
the temporary Prefect server, its training-slot limit). A run that ends, however, marks it
finished; one killed with SIGKILL cannot, and the next run that takes the lock finds the record
and closes what it left open.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import zc.lockfile

from seqlm.io import file_digest, write_json

STATE_DIR = Path(".seqlm")
LOCK = STATE_DIR / "lock"
RECORD = STATE_DIR / "run.json"
DVC_LOCK = Path(".dvc") / "tmp" / "lock"
DVC_RECORDED = STATE_DIR / "dvc-recorded.json"
DVC_FILES = (Path("dvc.lock"), Path(".dvc") / "config", Path(".dvc") / "config.local")

_held: dict[Path, zc.lockfile.LockFile] = {}     # locks this process holds (re-entrant)


class WorkspaceBusy(RuntimeError):
    """Another process is running the pipeline (or DVC) in this workspace."""


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def holder(lock: Path) -> str:
    """What a lock file says about its holder: 'pid N (command, since T)'."""
    try:
        text = lock.read_text(encoding="utf-8").strip()
    except OSError:
        return "an unknown process"
    pid, _, rest = text.partition(" ")
    return f"pid {pid} ({rest})" if rest else f"pid {pid}"


# Called with what holds the workspace while it is busy, instead of refusing at once: returns
# when the lock should be tried again, or raises to give up (a run's deadline, Ctrl-C).
Wait = Callable[[str], None]


@contextlib.contextmanager
def _locked(lock: Path, label: str, busy: str, wait: Wait | None = None) -> Iterator[None]:
    if lock in _held:                       # this process holds it already: nested use
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            handle = zc.lockfile.LockFile(str(lock),
                                          content_template=f"{{pid}} {label}, since {_now()}")
            break
        except zc.lockfile.LockError:
            if wait is None:
                raise WorkspaceBusy(f"{busy} {holder(lock)} ({lock}); wait for it to end or "
                                    "stop it (kill that PID)") from None
            wait(f"{busy} {holder(lock)} ({lock})")
    _held[lock] = handle
    try:
        yield
    finally:
        del _held[lock]
        handle.close()


@contextlib.contextmanager
def workspace_lock(command: str, dvc: bool = False, wait: Wait | None = None) -> Iterator[None]:
    """Hold the workspace for `command`; with dvc=True DVC's repository lock too. A busy
    workspace is refused at once (WorkspaceBusy), or waited for with `wait`."""
    with _locked(LOCK, command, "this workspace is in use by", wait):
        if dvc and DVC_LOCK.parent.parent.is_dir():
            with _locked(DVC_LOCK, command, "DVC is running in this workspace:", wait):
                yield
        else:
            yield


@contextlib.contextmanager
def dvc_lock_released() -> Iterator[None]:
    """Let this process's own `dvc` commands run: they need the repository lock it holds."""
    handle = _held.pop(DVC_LOCK, None)
    if handle is None:
        yield
        return
    handle.close()
    try:
        yield
    finally:
        _held[DVC_LOCK] = zc.lockfile.LockFile(
            str(DVC_LOCK), content_template=f"{{pid}} seqlm run, since {_now()}")


def dvc_state(records: dict[str, dict[str, Any]]) -> str:
    """One digest of what `dvc commit` and `dvc push` make true: dvc.lock and the DVC config as
    they are on disk, and every stage's inputs and outputs (its record's digests)."""
    digest = hashlib.sha256()
    for path in DVC_FILES:
        digest.update(f"|{path}:{file_digest(path) if path.is_file() else 'missing'}".encode())
    for label in sorted(records):
        record = records[label]
        digest.update(f"|{label}:{record.get('inputs')}:{record.get('outputs')}".encode())
    return digest.hexdigest()


def dvc_recorded() -> str | None:
    """The dvc_state() the last successful `dvc commit` + `dvc push` of a run left, if any."""
    try:
        return json.loads(DVC_RECORDED.read_text(encoding="utf-8"))["state"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_dvc(state: str) -> None:
    write_json(DVC_RECORDED, {"state": state, "at": _now()})


class RunRecord:
    """`.seqlm/run.json`: what the running pipeline owns, for the next run to close if this one
    is killed. Written atomically at every change."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {"pid": os.getpid(), "started": _now(), "finished": False,
                                     "mlflow_uri": None, "flow_run_id": None, "stage_run": None,
                                     "server_pid": None, "training_limit": None}
        self._save()

    def set(self, **values: Any) -> None:
        self.data.update(values)
        self._save()

    def finish(self) -> None:
        self.set(finished=True)

    def _save(self) -> None:
        write_json(RECORD, self.data)


@contextlib.contextmanager
def run_record(log: Any) -> Iterator[RunRecord]:
    """This run's record, taken after closing what the run before it left open (before its
    record is replaced: a run killed meanwhile leaves it for the next one), and marked finished
    however this run ends but SIGKILL. Call while holding the workspace lock."""
    previous = last_run()
    if previous is not None:
        close_previous(previous, log)
    record = RunRecord()
    try:
        yield record
    finally:
        record.finish()


def last_run() -> dict[str, Any] | None:
    """The record of the run before this one (call while holding the lock)."""
    try:
        data = json.loads(RECORD.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return None if data.get("pid") == os.getpid() and not data.get("finished") else data


def close_previous(record: dict[str, Any], log: Any) -> None:
    """Close what the run before this one left open. Killed (it never marked its record
    finished): its orphaned temporary Prefect server, its training-slot limit, its Prefect flow
    run (Crashed) and its MLflow runs (FAILED, with the reason). Finished: MLflow runs it could
    not close (its store failed meanwhile). Each part is best effort: a store that is gone is
    reported, not raised."""
    if record.get("finished"):
        reason = (f"the pipeline run (pid {record.get('pid')}, started {record.get('started')}) "
                  f"ended without closing this run; closed by the next run at {_now()}")
        steps = (_close_mlflow_runs,)
    else:
        reason = (f"the pipeline process (pid {record.get('pid')}, started "
                  f"{record.get('started')}) was killed before it ended; closed by the next run "
                  f"at {_now()}")
        log.warning("an earlier run was killed before it ended: %s; closing what it left open",
                    holder_of(record))
        steps = (_close_mlflow_runs, _stop_orphan_server, _close_prefect_run)
    for step in steps:
        try:
            step(record, reason, log)
        except Exception as exc:  # noqa: BLE001 - cleanup of one store must not stop the run
            log.warning("could not close the earlier run's %s: %s", step.__name__[1:],
                        " ".join(str(exc).split())[:200])


def holder_of(record: dict[str, Any]) -> str:
    return f"pid {record.get('pid')}, started {record.get('started')}"


def _close_mlflow_runs(record: dict[str, Any], reason: str, log: Any) -> None:
    from seqlm.tracking import STAGE_RUN_TAG, close_runs_of
    tag, owner = ("prefect.flow_run_id", record.get("flow_run_id")) if record.get("flow_run_id") \
        else (STAGE_RUN_TAG, record.get("stage_run"))
    if not record.get("mlflow_uri") or not owner:
        return
    for name in close_runs_of(tag, owner, record["mlflow_uri"], reason):
        log.warning("MLflow run %s of the earlier run closed as FAILED", name)


def _stop_orphan_server(record: dict[str, Any], reason: str, log: Any) -> None:
    import psutil
    pid = record.get("server_pid")
    if not pid or not psutil.pid_exists(pid):
        return
    process = psutil.Process(pid)
    if "prefect.server.api.server" not in " ".join(process.cmdline()):
        return                                   # the PID was reused by something else
    process.terminate()
    try:
        process.wait(timeout=10)
    except psutil.TimeoutExpired:
        process.kill()
    log.warning("stopped the killed run's orphaned temporary Prefect server (pid %d)", pid)


def _close_prefect_run(record: dict[str, Any], reason: str, log: Any) -> None:
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed
    with get_client(sync_client=True) as client:
        if record.get("training_limit"):
            with contextlib.suppress(ObjectNotFound):
                client.delete_global_concurrency_limit_by_name(record["training_limit"])
        if record.get("flow_run_id"):
            with contextlib.suppress(ObjectNotFound):
                run = client.read_flow_run(record["flow_run_id"])
                if not run.state or not run.state.is_final():
                    client.set_flow_run_state(run.id, Crashed(message=reason), force=True)
                    log.warning("Prefect flow run %s marked Crashed", run.name)
