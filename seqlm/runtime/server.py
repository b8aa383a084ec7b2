"""The Prefect servers the CLI starts: the temporary one of `seqlm run`, owned by the run, and
the lasting one of `seqlm schedule`.

Prefect starts one by itself when PREFECT_API_URL is unset, but in the terminal's process
group: Ctrl-C kills it at the same instant as the run, which then cannot record its end, and
`kill -9` of the run leaves it running forever. This one is the same server (Prefect's app, its
settings for a temporary server), started in a session of its own, so that the run decides when
it stops, and on Linux bound to the run's life by the kernel (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from seqlm import interrupt

STARTUP_TIMEOUT_S = 120      # seconds on idle cores; a busy machine can take much longer
started_pid: int | None = None   # the server this process started, for the run's record
LASTING_LOG = Path(".seqlm/prefect-server.log")   # what `seqlm schedule`'s server prints
MLFLOW_UI_LOG = Path(".seqlm/mlflow-ui.log")       # what `seqlm ui`'s MLflow server prints
LASTING_UI = f"http://127.0.0.1:{os.environ.get('PREFECT_SERVER_API_PORT', '4200')}"


class ServerError(RuntimeError):
    """The temporary Prefect server did not start."""


def spawn(args: list[str], env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen:
    """A server process of this one: in a session of its own (the terminal's Ctrl-C reaches this
    process only, which then stops the server itself) and ended by the kernel if this process
    dies."""
    return subprocess.Popen(args, env=env, start_new_session=True,
                            preexec_fn=interrupt.die_with_parent, **popen)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_temporary_server(wait: bool = True) -> str | None:
    """Serve the Prefect API on 127.0.0.1 until this process exits, unless PREFECT_API_URL
    already names a server; sets PREFECT_API_URL (call before importing prefect) and returns
    it (None when it started nothing). The server is stopped at exit, after the worker threads
    of the run have ended, so that an interrupted task can still record its state.

    wait=False returns as soon as the server process is started (it needs seconds to come up):
    the caller does its own start-up meanwhile, and calls wait_for_server() before it uses the
    API."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    # What Prefect's own temporary server runs: no UI, the services of a temporary server.
    # No telemetry from a server that lives for one run: offline, it logs an ERROR line into
    # the run's terminal ("Failed to send telemetry").
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "0"}
    process = spawn([sys.executable, "-m", "seqlm.runtime.prefect_db", "--port", str(port)], env)
    atexit.register(stop, process)       # runs after the interpreter has joined the threads
    global started_pid, _starting
    started_pid = process.pid
    _starting = (process, api_url)
    os.environ["PREFECT_API_URL"] = api_url
    # The links Prefect prints ("View at ...") and the run's own point where `prefect server
    # start` in the repository serves this run's database: the temporary server has no UI and
    # is gone when the run ends.
    os.environ.setdefault("PREFECT_UI_URL", LASTING_UI)
    if wait:
        wait_for_server()
    return api_url


_starting: tuple[subprocess.Popen, str] | None = None   # started, not yet seen healthy


def wait_for_server() -> None:
    """Return once the server start_temporary_server() started answers; ServerError if it
    exits or does not answer within STARTUP_TIMEOUT_S. Nothing to wait for: returns at once."""
    global _starting
    if _starting is None:
        return
    process, api_url = _starting
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not healthy(api_url):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise ServerError(f"the temporary Prefect server did not start on {api_url} "
                              f"(exit code {process.poll()}); set PREFECT_API_URL to use a "
                              "running `prefect server start`")
        time.sleep(0.05)
    _starting = None


def start_lasting_server(port: int) -> subprocess.Popen | None:
    """`prefect server start` on 127.0.0.1:port, with its UI, for `seqlm schedule` and `seqlm
    ui`, unless a server answers there already (then None). Asks nothing and writes no profile
    (a terminal would otherwise get Prefect's interactive profile question), and its UI calls
    the API on the same port. ServerError if it does not answer within STARTUP_TIMEOUT_S."""
    api_url = f"http://127.0.0.1:{port}/api"
    # PREFECT_UI_URL: the links the server writes into the messages of `seqlm notify`.
    env = {**os.environ, "PREFECT_CLI_PROMPT": "false", "PREFECT_SERVER_API_HOST": "127.0.0.1",
           "PREFECT_SERVER_API_PORT": str(port), "PREFECT_UI_API_URL": api_url,
           "PREFECT_UI_URL": f"http://127.0.0.1:{port}"}
    env.pop("PREFECT_API_URL", None)
    # The home's database, given in a process of its own: Prefect reads its settings once, when
    # imported, and this process has still to set PREFECT_API_URL to this server (`seqlm
    # schedule`); imported here, it would serve on a temporary server of its own.
    subprocess.run([sys.executable, "-m", "seqlm.runtime.prefect_db"], env=env, check=True)
    return _serve([sys.executable, "-m", "prefect", "--no-prompt", "server", "start", "--host",
                   "127.0.0.1", "--port", str(port)], env, api_url, LASTING_LOG, "Prefect server")


def start_mlflow_ui(store: str, port: int) -> subprocess.Popen | None:
    """`mlflow server` (what `mlflow ui` runs) of tracking store `store` on 127.0.0.1:port,
    unless a server answers there already (then None); one worker, enough for one person."""
    return _serve([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                  dict(os.environ), f"http://127.0.0.1:{port}", MLFLOW_UI_LOG, "MLflow UI")


def _serve(args: list[str], env: dict[str, str], url: str, log: Path,
           what: str) -> subprocess.Popen | None:
    """Start the server `args` (output appended to `log`) and wait until `url`/health answers;
    None if something answers there already."""
    if healthy(url):
        return None
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as output:
        process = spawn(args, env, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while not healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise ServerError(f"the {what} did not start on {url.removesuffix('/api')} "
                                  f"(exit code {process.poll()}); its output is in {log}")
            time.sleep(0.2)
    except BaseException:                # Ctrl-C meanwhile too
        stop(process)
        raise
    return process
