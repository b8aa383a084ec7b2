"""prefect.yaml the Prefect way: a real server, a process work pool, `prefect deploy`, a worker
subprocess, and a triggered run of the deployment that completes."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from test_dvc import make_repo

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api(url: str, body: dict | None = None) -> object:
    request = urllib.request.Request(url, data=json.dumps(body or {}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_a_deployment_runs_through_a_process_worker(tmp_path: Path):
    root, env = make_repo(tmp_path / "repo", tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**env, "PREFECT_API_URL": url, "PWD": str(root)}
    prefect = [str(Path(sys.executable).parent / "prefect")]
    logs = tmp_path / "logs"
    logs.mkdir()
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    procs = [subprocess.Popen([*prefect, "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=server_env, stdout=open(logs / "server.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)]
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, (logs / "server.log").read_text()[-2000:]
                time.sleep(1)

        def cli(*args: str) -> str:
            result = subprocess.run([*prefect, *args], cwd=root, env=env, capture_output=True,
                                    text=True, timeout=300)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            return result.stdout
        cli("work-pool", "create", "seqlm", "--type", "process")
        cli("--no-prompt", "deploy", "--all")
        [deployment] = api(f"{url}/deployments/filter")
        assert deployment["name"] == "pipeline" and deployment["work_pool_name"] == "seqlm"
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]
        procs.append(subprocess.Popen([*prefect, "worker", "start", "--pool", "seqlm"], cwd=root,
                                      env=env, stdout=open(logs / "worker.log", "w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
        flow_run = api(f"{url}/deployments/{deployment['id']}/create_flow_run", {})
        deadline = time.monotonic() + 400
        while True:
            state = json.loads(
                urllib.request.urlopen(f"{url}/flow_runs/{flow_run['id']}", timeout=10).read())
            if state["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert time.monotonic() < deadline, (logs / "worker.log").read_text()[-3000:]
            time.sleep(2)
        assert state["state_type"] == "COMPLETED", (logs / "worker.log").read_text()[-3000:]
        assert (root / "reports/summary.md").exists() and (root / "models/rnn/model.pt").exists()
    finally:
        for proc in procs[::-1]:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
