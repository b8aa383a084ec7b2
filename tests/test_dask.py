"""The pipeline on a real Dask cluster (a scheduler and two workers on 127.0.0.1, started here):
the trainings run on different workers at the same time, and the outputs are the local run's."""
from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import write_params
from seqlm.params import load_params

pytestmark = pytest.mark.slow

SMALL = dict(ngrams={"max_n": 2}, train_ar={"epochs": 2}, evaluate={"num_chars": 5},
             train_lm={"epochs": 6, "hidden_scratch": 32, "hidden": 32,
                       "models": ["rnn_scratch", "gru"]})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def cluster(workdir: Path, tmp_path: Path):
    """`dask scheduler` and two `dask worker --nthreads 1 --resources GPU=1` processes, the
    workers in the repository root the stages' relative paths start from."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = [str(Path(sys.executable).parent / "dask")]
    logs = tmp_path / "dask-logs"
    logs.mkdir()
    procs = [subprocess.Popen([*dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], stdout=open(logs / "scheduler.log", "w"),
                              stderr=subprocess.STDOUT)]
    for i in range(2):
        procs.append(subprocess.Popen(
            [*dask, "worker", address, "--nthreads", "1", "--resources", "GPU=1",
             "--no-dashboard", "--name", f"worker-{i}"], cwd=workdir,
            stdout=open(logs / f"worker-{i}.log", "w"), stderr=subprocess.STDOUT))
    try:
        from distributed import Client
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for proc in procs[::-1]:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def digests(root: Path) -> dict[str, str]:
    out = {}
    for folder in ("data/processed", "data/ngrams", "models", "reports"):
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def test_the_pipeline_on_a_dask_cluster(workdir, cluster, prefect_server, monkeypatch, tmp_path):
    from flows.pipeline import pipeline, task_runner_for
    write_params(workdir, **SMALL)
    # the local runner's outputs first, in a copy of the workspace
    local = tmp_path / "local"
    shutil.copytree(workdir, local)
    monkeypatch.chdir(local)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{local / 'mlflow.db'}")
    pipeline(params_file="params.yaml", record_dvc=False)

    monkeypatch.chdir(workdir)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # and the n-grams counted by one task per shard on the workers (7 char + 2 word shards)
    write_params(workdir, execution={"task_runner": "dask", "dask_address": cluster},
                 ngrams={"shard_tokens": 25_000, "partitions": 3})
    params = load_params()
    states = pipeline.with_options(task_runner=task_runner_for(params))(
        params_file="params.yaml", record_dvc=False)
    assert set(states.values()) == {"Completed"}

    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name("seqlm").experiment_id])}
    # the trainings ran on the cluster's two workers, each holding its worker's one `GPU`, at
    # the same time
    placed = {m: runs[m].data.tags["worker"] for m in ("rnn_scratch", "gru")}
    assert all(w.startswith("tcp://127.0.0.1:") for w in placed.values())
    assert len(set(placed.values())) == 2, placed
    from prefect import get_client
    from prefect.client.schemas.filters import (TaskRunFilter, TaskRunFilterFlowRunId,
                                               TaskRunFilterName)
    parent = next(r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags)
    with get_client(sync_client=True) as prefect:
        spans = sorted((r.start_time, r.end_time) for r in prefect.read_task_runs(
            task_run_filter=TaskRunFilter(
                name=TaskRunFilterName(like_="train_lm["),
                flow_run_id=TaskRunFilterFlowRunId(any_=[parent.data.tags["prefect.flow_run_id"]]))))
        shards, reduces = (prefect.read_task_runs(task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(like_=name),
            flow_run_id=TaskRunFilterFlowRunId(any_=[parent.data.tags["prefect.flow_run_id"]])))
            for name in ("ngrams_shard[", "ngrams_reduce["))
    assert len(spans) == 2 and spans[1][0] < spans[0][1], "the trainings did not overlap"
    assert len(shards) == 9 and {r.state_name for r in shards} == {"Completed"}
    assert len(reduces) == 2 * 3 and {r.state_name for r in reduces} == {"Completed"}
    assert not (workdir / ".seqlm" / "ngram-shards").exists()
    # and every output is the local runner's, byte for byte
    assert digests(workdir) == digests(local)

    # One record of the stages for both runners: unchanged, a Dask run counts no shard again and
    # a local run after it finds every stage cached too
    again = pipeline.with_options(task_runner=task_runner_for(params))(
        params_file="params.yaml", record_dvc=False)
    write_params(workdir, execution={"task_runner": "local"},
                 ngrams={"shard_tokens": 25_000, "partitions": 3})
    local_again = pipeline(params_file="params.yaml", record_dvc=False)
    assert set(again.values()) == set(local_again.values()) == {"Cached"}
    with get_client(sync_client=True) as prefect:
        assert len(prefect.read_task_runs(task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(like_="ngrams_shard[")))) == 9
    assert len(client.search_runs([client.get_experiment_by_name("seqlm").experiment_id])) \
        == len(runs) + 2                       # the two parent runs; no training run
