"""dvc.yaml drives the same stages: `dvc repro`, `dvc exp run -S`, and a flow run that leaves
dvc.lock describing exactly what it wrote, in a temporary git repository."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, write_params

pytestmark = pytest.mark.slow

GIT_ENV = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}


def _run(args: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, dict]:
    """A git clone-alike of this repository with small, offline params."""
    root = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["download"]["sources"] = ["data/mirror/timemachine.txt"]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_params(root, ngrams={"max_n": 2}, train_ar={"epochs": 2},
                 train_lm={"epochs": 2, "hidden_scratch": 16, "hidden": 16, "models": ["rnn"]},
                 evaluate={"num_chars": 5})
    env = {**os.environ, **GIT_ENV,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    _run(["git", "init", "-q"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "init"], root, env)
    return root, env


def _dvc(root: Path, env: dict, *args: str) -> str:
    return _run([sys.executable, "-m", "dvc", *args], root, env)


def test_flow_run_leaves_a_clean_dvc_status_and_repro_agrees(repo):
    root, env = repo
    _run([sys.executable, "-m", "seqlm.cli", "run"], root, env)
    assert "up to date" in _dvc(root, env, "status")
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"download", "preprocess", "ngrams", "sine", "train_ar",
                         "train_lm@rnn", "evaluate"}
    # dvc agrees that nothing needs to run, and the artifacts were pushed to the local remote
    out = _dvc(root, env, "repro")
    assert "Running stage" not in out and "Stage 'evaluate' didn't change" in out
    assert "in sync" in _dvc(root, env, "status", "--cloud")
    metrics = json.loads(_dvc(root, env, "metrics", "show", "--json"))
    data = metrics[""]["data"]
    assert data["reports/metrics.json"]["data"]["lm"]["rnn"]["val_perplexity"] > 1
    assert data["reports/ngrams.json"]["data"]["word_1_distinct"] == 4579


def test_dvc_repro_and_exp_run(repo):
    root, env = repo
    out = _dvc(root, env, "repro")
    assert "Running stage 'train_lm@rnn'" in out and "Running stage 'evaluate'" in out
    assert "up to date" in _dvc(root, env, "status")
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "repro"], root, env)
    out = _dvc(root, env, "exp", "run", "-S", "train_ar.epochs=3")
    assert "Running stage 'train_ar'" in out and "Running stage 'train_lm@rnn'" not in out
    shown = _dvc(root, env, "exp", "show", "--csv")
    assert "train_ar.epochs" in shown.splitlines()[0]
    assert any(",3," in line for line in shown.splitlines()[1:])   # the experiment's epochs=3
