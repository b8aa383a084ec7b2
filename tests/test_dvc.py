"""dvc.yaml drives the same stages: `dvc repro`, `dvc exp run -S`, and a flow run that leaves
dvc.lock describing exactly what it wrote, in a temporary git repository."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import vl_convert
import yaml
from mlflow import MlflowClient

from conftest import REPO, exclusive, write_params
from seqlm.params import load_params
from seqlm.stages import STAGES

pytestmark = pytest.mark.slow

GIT_ENV = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}


def _run(args: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def pipeline_outputs() -> list[str]:
    """dvc.lock and every path the stages write, as the checkout's params name them."""
    params = load_params(REPO / "params.yaml")
    written = ["dvc.lock"]
    for stage in STAGES:
        for item in stage.items(params):
            written += stage.at(params, item).written()
    return written


def is_output(name: str, outputs: list[str]) -> bool:
    return any(name == out or name.startswith(out.rstrip("/") + "/") for out in outputs)


def make_repo(root: Path, tmp_path: Path) -> tuple[Path, dict]:
    """A git clone-alike of this checkout (its committed and new source files, none of what a
    run of the pipeline left in it) with small, offline params."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    outputs = pipeline_outputs()
    for name in files:
        if (REPO / name).is_file() and (name.endswith("/.gitignore") or not is_output(name, outputs)):
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


def training_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("seqlm")
    return [r for r in client.search_runs([experiment.experiment_id])
            if not r.data.tags.get("seqlm.run") == "pipeline"] if experiment else []


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, dict]:
    return make_repo(tmp_path / "repo", tmp_path)


def _dvc(root: Path, env: dict, *args: str) -> str:
    return _run([sys.executable, "-m", "dvc", *args], root, env)


def test_flow_run_and_dvc_repro_agree_byte_for_byte(tmp_path):
    """`seqlm run` leaves a clean `dvc status`, and `dvc repro -f` of the training writes the
    same bytes (same params, seed, code and machine: the md5 of every output file and folder in
    dvc.lock is the same). A fresh repository's `dvc repro` of every stage: the next test."""
    (tmp_path / "a-state").mkdir()
    root, env = make_repo(tmp_path / "a", tmp_path / "a-state")
    _run([sys.executable, "-m", "seqlm.cli", "run"], root, env)
    assert "up to date" in _dvc(root, env, "status")
    lock_text = (root / "dvc.lock").read_text()
    lock = yaml.safe_load(lock_text)["stages"]
    assert set(lock) == {"download", "preprocess", "ngrams", "sine", "train_ar",
                         "train_lm@rnn", "evaluate"}
    # dvc agrees that nothing needs to run, and the artifacts were pushed to the local remote
    out = _dvc(root, env, "repro")
    assert "Running stage" not in out and "Stage 'evaluate' didn't change" in out
    assert "in sync" in _dvc(root, env, "status", "--cloud")
    # a run that changes nothing leaves DVC alone (no commit, no push: a second of a no-op
    # run); one that finds dvc.lock gone writes it again, the same bytes, and pushes
    for change, said in ((None, "dvc.lock already describes these artifacts"),
                         ("dvc.lock", "dvc.lock updated and artifacts pushed")):
        if change:
            (root / change).unlink()
        again = subprocess.run([sys.executable, "-m", "seqlm.cli", "run"], cwd=root, env=env,
                               capture_output=True, text=True, timeout=600)
        assert again.returncode == 0 and said in again.stdout + again.stderr, again.stderr
        assert (root / "dvc.lock").read_text() == lock_text
    metrics = json.loads(_dvc(root, env, "metrics", "show", "--json"))
    data = metrics[""]["data"]
    rnn = data["reports/metrics/rnn.json"]["data"]
    assert rnn["val_ppl_best"] > 1 and rnn["best_epoch"] in (1, 2)
    assert set(rnn) == {"best_epoch", "val_ppl_best", "val_nats_best", "val_bits_best",
                        "val_ppl_last", "train_ppl_last"}
    assert set(data["reports/metrics/unigram.json"]["data"]) == {
        "val_ppl_best", "val_nats_best", "val_bits_best", "train_ppl"}
    # the sine MLP's k-step errors compare across experiments too
    assert set(data) == {f"reports/metrics/{m}.json" for m in ("rnn", "kneser_ney_3gram",
                                                                "unigram")} | {"reports/train_ar.json"}
    assert data["reports/train_ar.json"]["data"]["kstep_mse_64"] > 0
    # one row per model and baseline, perplexities and cross-entropies (nats, bits): readable in
    # a 150-column terminal (the sine MLP's errors have columns of their own: `dvc metrics
    # show` of all of them is wider)
    table = _dvc(root, env, "metrics", "show", "reports/metrics")
    assert max(len(line) for line in table.splitlines()) <= 150, table
    assert "kstep_mse_64" in _dvc(root, env, "metrics", "show", "reports/train_ar.json")
    # one comparison per metric, k on the x axis of the k-step chart
    plots = json.loads(_dvc(root, env, "plots", "show", "--json"))["data"]
    assert {"reports/plots/val_perplexity.csv", "reports/plots/train_perplexity.csv",
            "reports/plots/kstep.csv", "reports/plots/comparison.png"} <= set(plots)
    kstep = plots["reports/plots/kstep.csv"][0]["content"]
    assert kstep["encoding"]["x"]["field"] == "k"
    # drawn as a person sees it: the models this run trained and the baselines, nothing for the
    # models it did not (DVC's own template drew them as a line at 0, named in the legend)
    for name, shown in [("val_perplexity", {"rnn", "kneser_ney_3gram", "unigram"}),
                        ("train_perplexity", {"rnn"})]:
        svg = vl_convert.vegalite_to_svg(plots[f"reports/plots/{name}.csv"][0]["content"])
        texts = set(re.findall(r"<text[^>]*>([^<]+)</text>", svg))
        assert shown <= texts and not {"gru", "lstm", "rnn_scratch"} & texts, texts
    # the stage with state of its own in the workspace (its checkpoints), run again by DVC,
    # writes the same bytes: dvc.lock does not change (every stage from nothing, through DVC
    # alone: the next test)
    out = _dvc(root, env, "repro", "-f", "-s", "train_lm@rnn")
    assert "Running stage 'train_lm@rnn'" in out and "Running stage 'evaluate'" not in out
    assert (root / "dvc.lock").read_text() == lock_text


def test_dvc_repro_in_a_fresh_repository_writes_what_seqlm_run_wrote(tmp_path, small_run):
    """A second repository from scratch, through DVC alone, writes the dvc.lock of a `seqlm run`
    of the same checkout and params (the shared small run, conftest.py); `seqlm run` then finds
    every stage up to date; `dvc exp run -S` runs what a param changes and nothing else."""
    ran, _, ran_lock = small_run
    with exclusive(ran_lock):
        lock_text = (ran / "dvc.lock").read_text()
    lock = yaml.safe_load(lock_text)["stages"]
    (tmp_path / "b-state").mkdir()
    other, env = make_repo(tmp_path / "b", tmp_path / "b-state")
    out = _dvc(other, env, "repro")
    assert "Running stage 'train_lm@rnn'" in out and "Running stage 'evaluate'" in out
    other_lock = yaml.safe_load((other / "dvc.lock").read_text())["stages"]
    outs = [{(stage, o["path"]): o["md5"] for stage, body in stages.items()
             for o in body.get("outs", [])} for stages in (lock, other_lock)]
    assert len(outs[0]) >= 10 and outs[0] == outs[1]
    assert other_lock == lock
    # what `dvc repro` ran, `seqlm run` knows is up to date: one record for both doors
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    trainings = training_runs(client)
    assert {r.info.run_name for r in trainings} == {"ar_mlp", "rnn"}   # logged by the stages
    out = _run([sys.executable, "-m", "seqlm.cli", "run"], other, env)
    states = dict(line.split() for line in out.splitlines() if line.split()[-1:] in (
        ["Cached"], ["Completed"]))
    assert set(states.values()) == {"Cached"} and len(states) == 7, out
    assert len(training_runs(client)) == len(trainings)
    assert (other / "dvc.lock").read_text() == lock_text
    [parent] = [r for r in client.search_runs([client.get_experiment_by_name("seqlm")
                                               .experiment_id]) if r.data.tags.get("seqlm.run")]
    assert "dvc.lock" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert len(parent.data.tags["dvc_lock_md5"]) == 32

    # an experiment runs the stage its param changes, and only that one
    assert "up to date" in _dvc(other, env, "status")
    _run(["git", "add", "-A"], other, env)
    _run(["git", "commit", "-qm", "repro"], other, env)
    out = _dvc(other, env, "exp", "run", "-S", "train_ar.epochs=3")
    assert "Running stage 'train_ar'" in out and "Running stage 'train_lm@rnn'" not in out
    shown = _dvc(other, env, "exp", "show", "--csv")
    assert "train_ar.epochs" in shown.splitlines()[0]
    assert any(",3," in line for line in shown.splitlines()[1:])   # the experiment's epochs=3


def test_dvc_repro_during_a_run_is_refused_before_it_deletes_anything(repo, monkeypatch):
    """`seqlm run` holds DVC's repository lock: a `dvc repro` meanwhile fails at once, before
    it removes any stage output."""
    from seqlm.runtime.workspace import workspace_lock
    root, env = repo
    _run([sys.executable, "-m", "seqlm.cli", "stage", "download"], root, env)
    corpus = (root / "data/raw/timemachine.txt").read_bytes()
    monkeypatch.chdir(root)
    with workspace_lock("seqlm run", dvc=True):
        result = subprocess.run([sys.executable, "-m", "dvc", "repro", "download"], cwd=root,
                                env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and "Unable to acquire lock" in result.stderr + result.stdout
        stage = subprocess.run([sys.executable, "-m", "seqlm.cli", "stage", "download"], cwd=root,
                               env=env, capture_output=True, text=True, timeout=120)
        assert stage.returncode == 2 and f"in use by pid {os.getpid()} (seqlm run" in stage.stderr
    assert (root / "data/raw/timemachine.txt").read_bytes() == corpus
