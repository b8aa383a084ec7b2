"""`seqlm schedule` starts a real Prefect server on 127.0.0.1 and serves the flow on a cron."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

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


def test_schedule_serves_a_cron_deployment_on_a_local_server(tmp_path):
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(tmp_path / "schedule.log", "w")
    # In a scratch folder, and a cron that fires only on 29 February: nothing runs for real.
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "seqlm.cli", "schedule", "--cron", CRON,
                             "--port", str(port)], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        deployments: list = []
        while time.monotonic() < deadline and not deployments:
            assert proc.poll() is None, (tmp_path / "schedule.log").read_text()
            try:
                deployments = _post(f"{api}/deployments/filter", {})
            except OSError:
                pass
            time.sleep(2)
        assert deployments, (tmp_path / "schedule.log").read_text()
        deployment = deployments[0]
        assert deployment["name"] == "scheduled"
        assert deployment["parameters"] == {"params_file": "params.yaml"}
        schedules = deployment["schedules"]
        assert [s["schedule"]["cron"] for s in schedules] == [CRON]
        assert all(s["active"] for s in schedules)
        flows = _post(f"{api}/flows/filter", {})
        assert [f["name"] for f in flows] == ["pipeline"]
    finally:
        os.killpg(proc.pid, signal.SIGINT)          # Ctrl-C in the terminal: the whole group
        stopped = time.monotonic()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    # Ctrl-C stops serving within seconds, cleanly, and the server the command started is gone
    assert proc.returncode is not None and time.monotonic() - stopped < 30
    assert "Traceback" not in (tmp_path / "schedule.log").read_text()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{api}/health", timeout=2)
