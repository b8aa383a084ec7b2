"""`seqlm schedule` in a real terminal (a pseudo-terminal: Prefect asks its profile question only
on one): it starts a Prefect server on 127.0.0.1 whose UI talks to its own port, serves the flow
on a cron schedule without asking anything or writing a profile, and Ctrl-C ends both."""
import json
import os
import pty
import select
import shutil
import signal
import socket
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow
CRON = "0 0 29 2 *"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict) -> list | dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


class Terminal:
    """A command on a pseudo-terminal of its own, as from a shell: its session, its controlling
    terminal, its output read from the other end."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:                       # the child: the terminal's foreground job
            os.chdir(cwd)
            os.execve(args[0], args, env)
        self.output = b""

    def read(self, seconds: float = 0.5) -> str:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                try:
                    self.output += os.read(self.fd, 65536)
                except OSError:                 # the command ended: no more output
                    break
        return self.output.decode(errors="replace")

    def ctrl_c(self) -> None:
        os.write(self.fd, b"\x03")              # the terminal sends SIGINT to the foreground job

    def wait(self, seconds: float) -> int | None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.read(0.2)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        return None


def test_schedule_serves_in_a_terminal_and_ctrl_c_stops_it(tmp_path):
    port = _free_port()
    profiles = tmp_path / "profiles.toml"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_PROFILES_PATH": str(profiles), "TERM": "xterm"}
    env.pop("PREFECT_API_URL", None)
    # In a scratch folder with the project's settings, and a cron that fires only on 29 February:
    # nothing runs for real.
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(REPO / "prefect.toml", tmp_path / "prefect.toml")
    terminal = Terminal([sys.executable, "-m", "seqlm.cli", "schedule", "--cron", CRON,
                         "--port", str(port)], tmp_path, env)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        deployments: list = []
        while time.monotonic() < deadline and not deployments:
            output = terminal.read(1)
            assert "Traceback" not in output and "proceed?" not in output, output
            try:
                deployments = _post(f"{api}/deployments/filter", {})
            except OSError:
                pass
        assert deployments, terminal.read()
        deployment = deployments[0]
        assert deployment["name"] == "scheduled"
        assert deployment["parameters"] == {"params_file": "params.yaml"}
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == [CRON]
        assert all(s["active"] for s in deployment["schedules"])
        # one run at a time; a run due meanwhile is queued, as the deployment of prefect.yaml's
        assert deployment["global_concurrency_limit"]["limit"] == 1
        assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
        output = terminal.read(3)
        assert f"Prefect UI: http://127.0.0.1:{port}" in output
        # served by this server: no temporary server of Prefect's own beside it
        assert "temporary server" not in output and "ephemeral" not in output, output
        # the UI the page loads calls the API of this port, not Prefect's default 4200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as page:
            assert json.loads(page.read())["api_url"] == api
    finally:
        terminal.ctrl_c()
        stopped = time.monotonic()
        code = terminal.wait(60)
        if code is None:
            os.kill(terminal.pid, signal.SIGKILL)
            terminal.wait(10)
    output = terminal.read()
    # Ctrl-C stops serving within seconds, cleanly, and the server the command started is gone
    assert code is not None and time.monotonic() - stopped < 30, output
    assert "Traceback" not in output and "stopped serving" in output, output
    assert not profiles.exists()                    # no profile written, none switched
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{api}/health", timeout=2)
