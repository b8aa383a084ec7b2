"""Scheduled runs that can be left alone, on real parts only: a `prefect server start`, the
deployment of prefect.yaml, a `prefect worker`, `seqlm notify` pointing at an HTTP receiver on
127.0.0.1. The tests share one server, worker and clone, and run in the order written: a run
that fails tells a person once; runs never collide; a run past its bound ends TimedOut and the
next resumes; a champion that moves is news, and a receiver that is down changes no run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
import zc.lockfile
from mlflow import MlflowClient

from test_deployment import free_port, run_logs, start_server, stop, wait_healthy
from test_dvc import make_repo, training_runs

pytestmark = pytest.mark.slow
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def api(url: str, body: dict | None = None) -> object:
    """A call of the Prefect API (POST with a body, else GET), tried again, as Prefect's own
    client does, while the busy server answers 503 (its SQLite database is locked)."""
    data = json.dumps(body).encode() if body is not None else None
    for attempt in range(10):
        request = urllib.request.Request(url, data=data,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == 9:
                raise
        time.sleep(1 + attempt)


class Receiver:
    """The notification target: records every POSTed message; also serves an empty corpus."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.messages.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def do_GET(self) -> None:              # the corpus source that turned empty
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Unattended:
    """A clone served by a worker of the deployment, with notifications to `receiver`."""

    def __init__(self, root: Path, env: dict, url: str, receiver: Receiver, logs: Path) -> None:
        self.root, self.env, self.url, self.receiver, self.logs = root, env, url, receiver, logs
        self.deployment = api(f"{url}/deployments/filter", {})[0]

    def seqlm(self, *args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "seqlm.cli", *args], cwd=self.root,
                                env=self.env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    def trigger(self, params_file: str = "params.yaml") -> str:
        return api(f"{self.url}/deployments/{self.deployment['id']}/create_flow_run",
                   {"parameters": {"params_file": params_file}})["id"]

    def flow_run(self, flow_run_id: str) -> dict:
        return api(f"{self.url}/flow_runs/{flow_run_id}")

    def wait(self, *flow_run_ids: str, seconds: float = 400) -> list[dict]:
        deadline = time.monotonic() + seconds
        while True:
            runs = [self.flow_run(i) for i in flow_run_ids]
            if all(run["state_type"] in FINAL for run in runs):
                return runs
            assert time.monotonic() < deadline, (self.logs / "worker.log").read_text()[-3000:]
            time.sleep(1)

    def states(self, flow_run_id: str) -> list[str]:
        states = api(f"{self.url}/flow_run_states/?flow_run_id={flow_run_id}")
        return [s["name"] for s in sorted(states, key=lambda s: s["timestamp"])]

    def messages(self, count: int, seconds: float = 180) -> list[dict]:
        """The messages received since the last call, once `count` have come (the server sends
        them after the runs end), and a few seconds more to see that no other comes."""
        deadline = time.monotonic() + seconds
        while len(self.receiver.messages) < count and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(3)
        messages, self.receiver.messages[:] = list(self.receiver.messages), []
        return messages

    def log_lines(self, *flow_run_ids: str) -> list[str]:
        return run_logs(self.url, *flow_run_ids)

    def events(self, name: str) -> list[dict]:
        return api(f"{self.url}/events/filter", {"filter": {"event": {"name": [name]}},
                                                   "limit": 50})["events"]

    def params_file(self, name: str, **sections: dict) -> str:
        """`name`: the clone's params.yaml with `sections` merged in."""
        params = yaml.safe_load((self.root / "params.yaml").read_text())
        for section, values in sections.items():
            params[section] = {**params[section], **values}
        (self.root / name).write_text(yaml.safe_dump(params, sort_keys=False))
        return name


@pytest.fixture(scope="module")
def unattended(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("unattended")
    root, env = make_repo(tmp / "repo", tmp)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**env, "PREFECT_API_URL": url, "PWD": str(root), "PREFECT_WORKER_QUERY_SECONDS": "2"}
    logs = tmp / "logs"
    logs.mkdir()
    prefect = [str(Path(sys.executable).parent / "prefect")]
    # A queued run asks for the slot again every 2 s instead of Prefect's 30.
    server_env = {**{k: v for k, v in env.items() if k != "PREFECT_API_URL"},
                  "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2"}
    procs = [start_server(port, server_env, logs / "server.log")]
    receiver = Receiver()
    try:
        wait_healthy(url, logs / "server.log")
        for args in (["work-pool", "create", "seqlm", "--type", "process"],
                     ["--no-prompt", "deploy", "--all"]):
            result = subprocess.run([*prefect, *args], cwd=root, env=env, capture_output=True,
                                    text=True, timeout=300)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        procs.append(subprocess.Popen([*prefect, "worker", "start", "--pool", "seqlm"], cwd=root,
                                      env=env, stdout=open(logs / "worker.log", "w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
        unattended = Unattended(root, env, url, receiver, logs)
        unattended.seqlm("notify", "--url", f"{receiver.url}/hook")
        yield unattended
    finally:
        receiver.stop()
        stop(procs)


def seqlm_automations(url: str) -> dict[str, dict]:
    return {a["name"]: a for a in api(f"{url}/automations/filter", {}) if "seqlm" in a["tags"]}


def seqlm_blocks(url: str) -> list[dict]:
    return api(f"{url}/block_documents/filter",
               {"block_documents": {"name": {"any_": ["seqlm-notify"]}}})


def test_notify_makes_the_block_and_automations_once(unattended):
    first = seqlm_automations(unattended.url)
    assert set(first) == {"seqlm-pipeline-failed", "seqlm-champion-moved",
                          "seqlm-champion-rejected"}
    assert [n for n, a in first.items() if not a["enabled"]] == ["seqlm-champion-rejected"]
    [block] = seqlm_blocks(unattended.url)
    assert {a["actions"][0]["block_document_id"] for a in first.values()} == {block["id"]}
    hook = f"{unattended.receiver.url}/hook"
    assert hook not in json.dumps(block)                  # the URL is the block's secret
    said = unattended.seqlm("notify", "--url", hook)      # again: the same ones, updated
    assert "automation seqlm-champion-rejected: off" in said, said
    assert {n: a["id"] for n, a in seqlm_automations(unattended.url).items()} == \
        {n: a["id"] for n, a in first.items()}
    assert [b["id"] for b in seqlm_blocks(unattended.url)] == [block["id"]]


def test_a_run_due_while_another_runs_waits_and_only_a_moved_champion_is_news(unattended):
    # a `seqlm run` holds the workspace: the deployment's run waits for it, the next one for
    # the deployment's slot
    (unattended.root / ".seqlm").mkdir(exist_ok=True)
    held = zc.lockfile.LockFile(str(unattended.root / ".seqlm" / "lock"),
                                content_template="{pid} seqlm run, since a minute ago")
    try:
        first, second = unattended.trigger(), unattended.trigger()
        deadline = time.monotonic() + 300
        while not any(line.startswith("waiting for the workspace: this workspace is in use by "
                                      f"pid {os.getpid()} (seqlm run, since a minute ago)")
                      for line in unattended.log_lines(first, second)):
            assert time.monotonic() < deadline, (unattended.logs / "worker.log").read_text()[-3000:]
            time.sleep(1)
    finally:
        held.close()
    runs = unattended.wait(first, second)
    assert [run["state_name"] for run in runs] == ["Completed", "Completed"]
    # one of them waited for the other's slot, never failed for it
    waited = [run for run in (first, second) if "AwaitingConcurrencySlot" in
              unattended.states(run)]
    assert len(waited) == 1, [unattended.states(run) for run in (first, second)]
    # the run that trained moved the champion (the first); the other, all cached, said nothing
    messages = unattended.messages(1)
    assert len(messages) == 1, (messages, [unattended.states(run) for run in (first, second)])
    [message] = messages
    assert message["subject"] == "seqlm: timemachine-rnn v1 is the new champion"
    trained = next(run for run in runs if run["id"] not in waited)
    body = message["body"]
    assert f"Run: {trained['name']} (deployment pipeline)" in body, body
    assert "(the first champion)" in body and "5000 characters of timemachine" in body, body
    assert f"/runs/flow-run/{trained['id']}" in body, body
    [training] = [r for r in training_runs(MlflowClient(unattended.env["MLFLOW_TRACKING_URI"]))
                  if r.info.run_name == "rnn"]
    assert f"/runs/{training.info.run_id}?" in body, body


def test_a_failing_run_sends_one_message_with_its_stage_error_and_links(unattended):
    # a source that may change (no checksum) and serves an empty file tonight
    flow_run = unattended.trigger(unattended.params_file("failing.yaml", download={
        "sources": [f"{unattended.receiver.url}/empty.txt"], "checksum": None}))
    [run] = unattended.wait(flow_run)
    assert run["state_name"] == "Failed"
    [message] = unattended.messages(1)
    assert message["subject"] == f"seqlm: pipeline run {run['name']} Failed"
    lines = dict(line.split(": ", 1) for line in message["body"].splitlines()[1:])
    assert lines["Stage"] == "download"
    assert lines["Error"].startswith("AllSourcesFailed: ") and \
        lines["Error"].endswith("empty.txt: corpus is empty"), lines
    assert lines["Prefect"].endswith(f"/runs/flow-run/{flow_run}")
    client = MlflowClient(unattended.env["MLFLOW_TRACKING_URI"])
    [parent] = client.search_runs([client.get_experiment_by_name("seqlm").experiment_id],
                                  filter_string=f"tags.`prefect.flow_run_id` = '{flow_run}'")
    assert f"/runs/{parent.info.run_id}?" in lines["MLflow"]
    assert parent.info.status == "FAILED" and "corpus is empty" in parent.data.tags["failure_reason"]


def test_a_run_past_its_bound_times_out_and_the_next_resumes_with_the_receiver_down(unattended):
    root = unattended.root

    def params_file(name: str, epochs: int, minutes: float | str) -> str:
        return unattended.params_file(name, train_lm={"epochs": epochs, "checkpoint_every": 1},
                                      execution={"timeout_minutes": minutes})

    timed = unattended.trigger(params_file("bounded.yaml", 1_000_000, 0.75))
    [run] = unattended.wait(timed)
    assert run["state_name"] == "TimedOut" and run["state_type"] == "FAILED"
    [message] = unattended.messages(1)
    assert message["subject"] == f"seqlm: pipeline run {run['name']} TimedOut"
    assert "Stage: train_lm[rnn]\n" in message["body"], message["body"]
    assert "RunTimedOut: the run passed its time bound of 45 s" in message["body"]
    # the training stopped within a batch, its checkpoints kept (it went on from the 2 epochs
    # of the first test's run, the same configuration); the workspace is free
    [checkpoint] = (root / "checkpoints" / "rnn").glob("*.pt")
    epoch = torch.load(checkpoint, weights_only=True)["epoch"]
    assert epoch > 2
    assert json.loads((root / ".seqlm" / "run.json").read_text())["finished"]
    client = MlflowClient(unattended.env["MLFLOW_TRACKING_URI"])
    stopped = [r for r in training_runs(client) if r.info.run_name == "rnn"
               and r.data.tags.get("prefect.flow_run_id") == timed]
    assert [r.info.status for r in stopped] == ["KILLED"]

    # The next run resumes there and moves the champion, while nothing receives messages:
    # the server's notification fails, the run does not.
    unattended.receiver.stop()
    resumed = unattended.trigger(params_file("resumed.yaml", epoch + 1, "auto"))
    [run] = unattended.wait(resumed)
    assert run["state_name"] == "Completed"
    [training] = [r for r in training_runs(client) if r.info.run_name == "rnn"
                  and r.data.tags.get("prefect.flow_run_id") == resumed]
    assert training.data.tags["resumed_from_epoch"] == str(epoch)
    champion = client.get_model_version_by_alias("timemachine-rnn", "champion")
    assert champion.run_id == training.info.run_id           # a message was due ...
    deadline = time.monotonic() + 60
    while not any(resumed in json.dumps(event) for event in
                  unattended.events("prefect.automation.triggered")):
        assert time.monotonic() < deadline, "the champion's automation never fired"
        time.sleep(1)                                         # ... and the server tried it


def test_notify_remove_deletes_the_automations_and_the_block(unattended):
    said = unattended.seqlm("notify", "--remove")
    assert "automation seqlm-champion-moved" in said and "block seqlm-notify" in said, said
    assert seqlm_automations(unattended.url) == {} and seqlm_blocks(unattended.url) == []
