"""Shared fixtures: a scratch repository root per test, one Prefect test server per session (per
pytest-xdist worker), and one small `seqlm run` that the tests reading its results share."""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Offline machines: Prefect's telemetry would only log connection errors.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# prefect.toml's patience for a temporary server's start, for the scratch repository roots that
# do not hold prefect.toml: Prefect's own 20 s ran out with the suite on every core.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# torch's OpenMP threads sleep while they wait instead of spinning (the same numbers). The suite
# keeps both cores busy, and a spinning thread then burns the core its partner needs: a 2-thread
# training beside two busy processes took 45.7 s instead of 8.0 s here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary repository root (the stages' working directory) holding params.yaml and the
    corpus mirror, with the canonical URL dropped from the sources so nothing goes online."""
    (tmp_path / "data" / "mirror").mkdir(parents=True)
    shutil.copy(REPO / "data" / "mirror" / "timemachine.txt", tmp_path / "data" / "mirror")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["download"]["sources"] = ["data/mirror/timemachine.txt"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_params(root: Path, **sections: dict) -> None:
    """Merge `sections` into root/params.yaml (e.g. train_lm={"epochs": 2})."""
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for name, values in sections.items():
        if isinstance(values, dict):
            params.setdefault(name, {}).update(values)
        else:
            params[name] = values
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """One real Prefect test server (SQLite) for every test that runs flows or task retries."""
    from prefect.testing.utilities import prefect_test_harness

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    with prefect_test_harness(server_startup_timeout=60):
        yield


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first (stable otherwise): pytest-xdist's workers then start on the long
    end-to-end tests and fill the rest in around them, instead of one worker finishing a long
    test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@contextlib.contextmanager
def exclusive(lock: Path) -> Iterator[None]:
    """Held by one process of this test run at a time (the xdist workers are processes)."""
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temporary folder of this test run: every xdist worker's own folder lies in it."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    """A clone of this checkout on small params after one `seqlm run` (its own Prefect home,
    `.prefect`, as a user's clone has): (root, env, lock). Made once per test run, by the first
    worker that needs it; the tests share it by holding `lock` while they use it."""
    from test_dvc import _run, make_repo
    shared = run_folder(tmp_path_factory) / "small-run"
    lock = run_folder(tmp_path_factory) / "small-run.lock"
    with exclusive(lock):
        if not (shared / "done").exists():
            shutil.rmtree(shared, ignore_errors=True)
            shared.mkdir()
            make_repo(shared / "repo", shared)
            _run([sys.executable, "-m", "seqlm.cli", "run"], shared / "repo",
                 small_run_env(shared))
            (shared / "done").touch()
    return shared / "repo", small_run_env(shared), lock


def small_run_env(shared: Path) -> dict[str, str]:
    """The environment make_repo gives a clone in `shared`, less PREFECT_HOME: the project's
    own setting applies (`.prefect` in the clone)."""
    from test_dvc import GIT_ENV
    env = {**os.environ, **GIT_ENV,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{shared / 'mlflow.db'}",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    for name in ("PREFECT_API_URL", "PREFECT_HOME"):
        env.pop(name, None)
    return env


@pytest.fixture
def after_small_run(small_run: tuple[Path, dict, Path]) -> Iterator[tuple[Path, dict]]:
    """The shared small run, this test's alone while it runs (each may start servers on its
    stores)."""
    root, env, lock = small_run
    with exclusive(lock):
        yield root, env
