"""Each clone has its own Prefect home (prefect.toml: `home = ".prefect"`): two clones side by
side do not see each other's runs or cached results, and `prefect server start` in a clone's
root shows that clone's runs."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from test_deployment import api, free_port, wait_healthy
from test_dvc import make_repo

pytestmark = pytest.mark.slow


def flow_runs(root: Path) -> list[str]:
    with sqlite3.connect(root / ".prefect" / "prefect.db") as db:
        return [name for (name,) in db.execute("SELECT name FROM flow_run")]


def test_two_clones_keep_their_own_runs_and_records(tmp_path: Path, after_small_run):
    # clone a: the shared clone after its `seqlm run` (conftest.py), with the project's own
    # Prefect home; clone b: a second clone of the same checkout and params beside it
    clones = {"a": after_small_run}
    (tmp_path / "b-state").mkdir()
    root, env = make_repo(tmp_path / "b", tmp_path / "b-state")
    env.pop("PREFECT_HOME")                           # the project's own setting applies
    clones["b"] = (root, env)
    result = subprocess.run([sys.executable, "-m", "seqlm.cli", "run", "--no-dvc"], cwd=root,
                            env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # the second clone ran every stage: the first clone's records are not its own
    assert "Cached" not in result.stdout and result.stdout.count("Completed") == 7, result.stdout
    runs = {name: flow_runs(root) for name, (root, _) in clones.items()}
    assert len(runs["a"]) == len(runs["b"]) == 1 and runs["a"] != runs["b"]
    assert all(any((root / ".seqlm" / "records").iterdir()) for root, _ in clones.values())

    # `prefect server start` in clone a shows clone a's run, and only that one
    root, env = clones["a"]
    port = free_port()
    log = tmp_path / "server.log"
    server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "--no-prompt",
                               "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=root, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/api"
        wait_healthy(url, log)
        assert [run["name"] for run in api(f"{url}/flow_runs/filter")] == runs["a"]
    finally:
        server.terminate()
        server.wait(timeout=30)
