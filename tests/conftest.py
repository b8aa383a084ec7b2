"""Shared fixtures: a scratch repository root per test and one Prefect test server per session."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Offline machines: Prefect's telemetry would only log connection errors.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


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
