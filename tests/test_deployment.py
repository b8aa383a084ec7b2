"""prefect.yaml the Prefect way: a real server, a process work pool, `prefect deploy`, a worker
subprocess; and one pipeline whatever starts it: a deployment run by the worker and `seqlm run`
share the stages' record (each reports the other's stages cached and trains nothing), and the
worker's flow runs carry the pipeline's own log lines."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import write_params
from test_dvc import make_repo, training_runs

pytestmark = pytest.mark.slow
STAGES = {"download", "preprocess", "ngrams", "sine", "train_ar", "train_lm[rnn]", "evaluate"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api(url: str, body: dict | None = None) -> object:
    request = urllib.request.Request(url, data=json.dumps(body or {}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def run_logs(url: str, *flow_run_ids: str, expect: str | None = None, seconds: float = 20
             ) -> list[str]:
    """Every log message of the flow runs, oldest first, in pages of 200 (the API's most). With
    `expect`, until a message contains it (for up to `seconds`): a run's process sends its logs
    in batches, and its last ones can reach the server after its final state."""
    deadline = time.monotonic() + seconds
    while True:
        messages: list[str] = []
        while True:
            page = api(f"{url}/logs/filter", {"logs": {"flow_run_id": {"any_": list(flow_run_ids)}},
                                               "sort": "TIMESTAMP_ASC", "limit": 200,
                                               "offset": len(messages)})
            messages += [entry["message"] for entry in page]
            if len(page) < 200:
                break
        if expect is None or any(expect in m for m in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(1)


def wait_healthy(url: str, log: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return
        except OSError:
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(1)


def stop(procs: list[subprocess.Popen]) -> None:
    """Stop the servers and workers a test started, the last started first."""
    for proc in procs[::-1]:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def start_server(port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1:port, its home's database copied from the machine's
    template first, as `seqlm schedule` does (Prefect's own first start builds it: 8 s more)."""
    subprocess.run([sys.executable, "-m", "seqlm.runtime.prefect_db"], env=env, check=True)
    return subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start",
                             "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stage_states(url: str, flow_run_id: str) -> dict[str, str]:
    """{stage: state name} of a flow run's stage task runs (task run names are `label-xyz`)."""
    runs = api(f"{url}/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return {run["name"].rsplit("-", 1)[0]: run["state_name"] for run in runs}


def test_a_deployment_and_seqlm_run_share_one_record_of_the_stages(tmp_path: Path):
    root, env = make_repo(tmp_path / "repo", tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**env, "PREFECT_API_URL": url, "PWD": str(root)}
    prefect = [str(Path(sys.executable).parent / "prefect")]
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = [start_server(port, {k: v for k, v in env.items() if k != "PREFECT_API_URL"},
                          logs / "server.log")]
    mlflow = MlflowClient(env["MLFLOW_TRACKING_URI"])
    try:
        wait_healthy(url, logs / "server.log")

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

        def run_deployment() -> str:
            flow_run = api(f"{url}/deployments/{deployment['id']}/create_flow_run", {})
            deadline = time.monotonic() + 400
            while True:
                state = json.loads(urllib.request.urlopen(f"{url}/flow_runs/{flow_run['id']}",
                                                          timeout=10).read())
                if state["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    break
                assert time.monotonic() < deadline, (logs / "worker.log").read_text()[-3000:]
                time.sleep(2)
            assert state["state_type"] == "COMPLETED", (logs / "worker.log").read_text()[-3000:]
            return flow_run["id"]

        # 1. the deployment, on a fresh clone: every stage runs
        first = run_deployment()
        assert (root / "reports/summary.md").exists() and (root / "models/rnn/model.pt").exists()
        assert stage_states(url, first) == {label: "Completed" for label in STAGES}
        trained = training_runs(mlflow)
        assert {r.info.run_name for r in trained} == {"ar_mlp", "rnn"}
        # the pipeline's own lines (training progress, the champion) are in the run's logs
        logs_of_run = run_logs(url, first, expect="is the new champion")
        assert any(line.startswith("rnn epoch 2: train ppl") for line in logs_of_run), logs_of_run
        assert any("is the new champion" in line for line in logs_of_run), logs_of_run

        def seqlm_run() -> dict[str, str]:
            result = subprocess.run([sys.executable, "-m", "seqlm.cli", "run"], cwd=root,
                                    env=env, capture_output=True, text=True, timeout=400)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            return dict(line.split() for line in result.stdout.splitlines()
                        if line.split()[-1:] in (["Cached"], ["Completed"]))

        # 2. `seqlm run` in the same clone: everything the deployment made is up to date
        assert seqlm_run() == {label: "Cached" for label in STAGES}
        assert len(training_runs(mlflow)) == len(trained)

        # 3. the deployment again, after `seqlm run`: all cached, nothing trained or registered
        third = run_deployment()
        assert stage_states(url, third) == {label: "Cached" for label in STAGES}
        assert len(training_runs(mlflow)) == len(trained)
        assert [int(v.version) for v in mlflow.search_model_versions("name='timemachine-rnn'")] == [1]

        # The reverse order: 4. `seqlm run` makes the records of the stages a change of params
        # reaches (the trainings and the evaluation); 5. the deployment and 6. `seqlm run` again
        # find every stage up to date and train nothing
        write_params(root, train_ar={"epochs": 3}, train_lm={"epochs": 3})
        retrained = {"train_ar", "train_lm[rnn]", "evaluate"}
        assert seqlm_run() == {label: "Completed" if label in retrained else "Cached"
                               for label in STAGES}
        trained = training_runs(mlflow)
        assert len(trained) == 4                     # ar_mlp and rnn once more
        fifth = run_deployment()
        assert stage_states(url, fifth) == {label: "Cached" for label in STAGES}
        assert seqlm_run() == {label: "Cached" for label in STAGES}
        assert len(training_runs(mlflow)) == len(trained)
    finally:
        stop(procs)
