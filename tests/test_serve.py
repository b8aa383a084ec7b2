"""The registered model served the MLflow way: `mlflow models serve -m
"models:/timemachine-rnn@champion" --env-manager local`, asked over HTTP as a client would."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import write_params
from seqlm.generate import load_trained, predict
from seqlm.params import load_params
from tasks.download import download
from tasks.preprocess import preprocess
from tasks.train_lm import train_lm

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    """Until `url` answers; fails with the server's output if it exits or times out first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)


def invoke(url: str, columns: list[str], rows: list[list]) -> tuple[int, dict]:
    body = json.dumps({"dataframe_split": {"columns": columns, "data": rows}}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_mlflow_serves_the_champion(workdir: Path, tmp_path: Path):
    write_params(workdir, train_lm={"epochs": 1, "hidden": 8, "models": ["rnn"]})
    params = load_params()
    download.fn(params)
    preprocess.fn(params)
    assert train_lm.fn(params, "rnn")["model_version"] == "1"
    port = free_port()
    # as from a shell with the venv active (the server is `uvicorn`, run from PATH)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = tmp_path / "serve.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m",
         "models:/timemachine-rnn@champion", "--env-manager", "local", "--host", "127.0.0.1",
         "--port", str(port)], cwd=tmp_path, env=env, stdout=open(log, "w"),
        stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/ping", server, log)
        # a batch of prefixes, with and without the optional columns
        status, answer = invoke(url, ["prefix", "num_chars"], [["time traveller", 10],
                                                               ["the", 5]])
        model, vocab, _ = load_trained(workdir / "models/rnn", device="cpu")
        assert status == 200 and answer["predictions"] == [
            predict("time traveller", 10, model, vocab, torch.device("cpu")),
            predict("the", 5, model, vocab, torch.device("cpu"))]
        status, answer = invoke(url, ["prefix", "num_chars", "temperature", "top_k", "seed"],
                                [["traveller", 8, 0.8, 5, 1]])
        assert status == 200 and answer["predictions"] == [predict(
            "traveller", 8, model, vocab, torch.device("cpu"), temperature=0.8, top_k=5, seed=1)]
        status, answer = invoke(url, ["prefix"], [["time"]])            # num_chars defaults
        assert status == 200 and len(answer["predictions"][0]) == len("time") + 50
        # a request without the one required column is the client's error, and says which
        status, answer = invoke(url, ["num_chars"], [[10]])
        assert 400 <= status < 500 and "prefix" in json.dumps(answer), (status, answer)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
