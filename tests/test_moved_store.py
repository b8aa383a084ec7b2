"""The default store moves with its clone: after a run, a copy of the clone in another folder
(the original gone) loads the champion and the runs' artifacts (seqlm/relative_artifacts.py)."""
from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from conftest import write_params
from seqlm.params import load_params
from seqlm.tracking import fluent_store
from tasks.download import download
from tasks.preprocess import preprocess
from tasks.train_lm import train_lm

pytestmark = pytest.mark.slow


def recorded_paths(db: Path, folder: Path) -> list[tuple[str, str]]:
    """(table, value) of every text cell of `db` that names `folder`."""
    with sqlite3.connect(db) as connection:
        found = []
        tables = [row[0] for row in connection.execute(
            "select name from sqlite_master where type = 'table'")]
        for table in tables:
            for row in connection.execute(f"select * from {table}"):
                found += [(table, cell) for cell in row
                          if isinstance(cell, str) and str(folder) in cell]
    return found


def test_a_moved_clone_loads_its_champion_and_artifacts(workdir: Path, monkeypatch):
    write_params(workdir, train_lm={"epochs": 1, "hidden": 8, "models": ["rnn"]})
    params = load_params()
    download.fn(params)
    preprocess.fn(params)
    train_lm.fn(params, "rnn")
    # Only MLflow's own empty "Default" experiment keeps an absolute location.
    assert {table for table, _ in recorded_paths(workdir / "mlflow.db", workdir)} <= {
        "experiments"}

    moved = workdir.parent / f"{workdir.name}-moved"
    shutil.copytree(workdir, moved)
    shutil.rmtree(workdir / "mlartifacts")
    (workdir / "mlflow.db").unlink()
    monkeypatch.chdir(moved)
    uri = f"sqlite:///{moved / 'mlflow.db'}"
    with fluent_store(uri):
        champion = mlflow.pyfunc.load_model("models:/timemachine-rnn@champion")
        assert champion.predict({"prefix": ["time traveller"], "num_chars": [5]})[0].startswith(
            "time traveller")
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name(params.tracking.experiment)
                              .experiment_id])[0]
    figure = next(item.path for item in client.list_artifacts(run.info.run_id)
                  if item.path.endswith(".png"))
    local = Path(client.download_artifacts(run.info.run_id, figure, str(moved / "got")))
    assert local.read_bytes().startswith(b"\x89PNG")
    assert str(workdir) not in run.info.artifact_uri


def test_a_tracking_server_keeps_the_artifacts_where_it_was_told(workdir: Path, tmp_path: Path):
    """Relative locations are for a local store only: with `mlflow server`, the pipeline's
    artifacts go to the server's --artifacts-destination, not to this machine's working
    directory (another machine's server could not read them there)."""
    import os
    import subprocess
    import sys

    from seqlm.runtime.server import stop
    from seqlm.tracking import Run
    from test_serve import free_port, wait_until_up
    port, served, log = free_port(), tmp_path / "server-artifacts", tmp_path / "server.log"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(served), "--workers", "1"], cwd=tmp_path, env=env, stdout=open(log, "w"),
        stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", server, log)
        run = Run(load_params(), "a-run", uri=f"http://127.0.0.1:{port}")
        run.open({})
        run.log_png(b"\x89PNG not really", "figure.png")
        assert run.error is None, run.error
        location = MlflowClient(run.uri).get_experiment(run.experiment_id).artifact_location
        assert location.startswith("mlflow-artifacts:"), location
        assert list(served.rglob("figure.png")) and not (workdir / "mlartifacts").exists()
    finally:
        stop(server)
