"""The `seqlm` command's process."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest

from conftest import write_params

# A cycle with a finalizer, left for the collector: the interpreter's final collections would
# finalize it, and print.
SCRIPT = """
import seqlm.cli

class Node:
    def __del__(self):
        print("collected at exit")

node = Node()
node.self = node
del node
"""


def test_the_exit_does_not_walk_the_heap_again():
    """The final collections of a process that imported the CLI skip what was alive at exit
    (gc.freeze as the last exit handler): torch's, MLflow's and Prefect's heaps took 1.7 s of a
    9-second re-run with nothing changed."""
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            check=True)
    assert "collected at exit" not in result.stdout
    # The same script without the CLI: the check itself can see a final collection.
    plain = subprocess.run([sys.executable, "-c", SCRIPT.replace("import seqlm.cli", "")],
                           capture_output=True, text=True, check=True)
    assert "collected at exit" in plain.stdout


def test_seqlm_stage_names_a_missing_or_extra_item(workdir):
    from typer.testing import CliRunner
    from seqlm.cli import app
    missing = CliRunner().invoke(app, ["stage", "train_lm"])
    assert missing.exit_code == 2 and "stage train_lm needs an item: one of train_lm.models" in \
        missing.output
    extra = CliRunner().invoke(app, ["stage", "sine", "rnn"])
    assert extra.exit_code == 2 and "stage sine takes no item, got 'rnn'" in extra.output
    unknown = CliRunner().invoke(app, ["stage", "train"])
    assert unknown.exit_code == 2 and "unknown stage 'train'" in unknown.output


@pytest.mark.slow
def test_a_failing_stage_is_one_line_in_the_terminal_and_a_traceback_in_the_run_logs(
        workdir, tmp_path):
    write_params(workdir, ngrams={"max_n": 2}, train_ar={"epochs": 2},
                 train_lm={"models": ["rnn"], "hidden": 8, "epochs": 2, "lr": 1e12})
    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    env.pop("PREFECT_API_URL", None)

    def seqlm_run(*options: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "seqlm.cli", "run", "--no-dvc", *options],
                              cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    failed = seqlm_run()
    assert failed.returncode == 2, failed.stderr[-3000:]
    said = failed.stdout + failed.stderr
    assert "Traceback" not in said and "Failed to write result" not in said, said
    [error] = [line for line in said.splitlines() if "training diverged" in line]
    assert error.startswith("error: TrainingError: rnn: training diverged at epoch 1"), said
    with sqlite3.connect(home / "prefect.db") as db:
        logged = [m for (m,) in db.execute("SELECT message FROM log")]
    assert any("Traceback" in m and "training diverged" in m for m in logged)

    debug = seqlm_run("--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stdout + debug.stderr

    # a stage that fails as it starts, one Prefect retries (the download): one line as well
    (workdir / "digits.txt").write_text("1234 5678\n" * 100)
    write_params(workdir, download={"sources": ["digits.txt"], "checksum": None})
    failed = seqlm_run()
    said = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "Traceback" not in said, said
    [error] = [line for line in said.splitlines() if "error" in line.lower()]
    assert error.startswith("error: ") and "digits.txt" in error, said
