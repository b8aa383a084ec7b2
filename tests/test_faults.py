"""Faults on real processes: SIGKILL, Ctrl-C and SIGTERM during training, two runs at once."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from mlflow import MlflowClient

from conftest import write_params
from seqlm.params import load_params
from seqlm.text import Vocab
from seqlm.train import train

pytestmark = pytest.mark.slow

# A training of EPOCHS lasts seconds (25 ms an epoch on a 2-core AMD EPYC family 26 model 2,
# more on older CPUs): the tests signal or kill it at epoch 4, while it still runs. At 40
# epochs (1 s) a SIGTERM once came after rnn_scratch had finished.
EPOCHS = 200
# Two trainings: side by side (on 2 cores or more), each in a process of its own.
TRAINING = dict(models=["rnn_scratch", "rnn"], hidden_scratch=64, hidden=32, epochs=EPOCHS,
                checkpoint_every=4, device="cpu")


@pytest.fixture
def env(workdir: Path, tmp_path: Path) -> dict[str, str]:
    write_params(workdir, ngrams={"max_n": 2}, train_ar={"epochs": 2}, train_lm=TRAINING,
                 evaluate={"num_chars": 5})
    environ = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
               "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    environ.pop("PREFECT_API_URL", None)
    return environ


def start_run(workdir: Path, env: dict[str, str], log: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "seqlm.cli", "run", "--no-dvc"], cwd=workdir,
                            env=env, stdout=open(workdir / log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for_training(workdir: Path, proc: subprocess.Popen, log: str, epoch: int = 4) -> int:
    """Block until the run has checkpointed `epoch` epochs; return the checkpoint's epoch."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, (workdir / log).read_text()[-3000:]
        for path in (workdir / "checkpoints" / "rnn_scratch").glob("*.pt"):
            try:
                done = torch.load(path, weights_only=True)["epoch"]
            except Exception:  # noqa: BLE001 - being replaced right now
                continue
            if done >= epoch:
                return done
        time.sleep(0.2)
    raise AssertionError("training did not start: " + (workdir / log).read_text()[-3000:])


def run_record(workdir: Path) -> dict:
    return json.loads((workdir / ".seqlm" / "run.json").read_text())


def alive(pid: int | None) -> bool:
    if not pid or not psutil.pid_exists(pid):
        return False
    return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def left_behind(workdir: Path) -> list[str]:
    """Processes other than this one still running in the workspace (a training's process,
    say), after a wait."""
    deadline = time.monotonic() + 10
    while True:
        left = []
        for process in psutil.process_iter(["cwd", "cmdline", "status"]):
            if process.info["cwd"] == str(workdir) and process.pid != os.getpid() and \
                    process.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(" ".join(process.info["cmdline"] or []))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def closed_runs(env: dict[str, str], record: dict) -> dict[str, str]:
    """{run name: run} of the MLflow runs a pipeline run opened (tagged with its Prefect flow
    run, wherever its stages ran); the parent is named "parent"."""
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`prefect.flow_run_id` = '{record['flow_run_id']}'")
    assert runs, record
    return {("parent" if "mlflow.parentRunId" not in r.data.tags else r.info.run_name): r
            for r in runs}


def straight_training(workdir: Path) -> dict[str, torch.Tensor]:
    params = load_params(workdir / "params.yaml")
    corpus = np.load(workdir / "data/processed/corpus_char.npy")
    vocab = Vocab.load(workdir / "data/processed/vocab_char.parquet")
    return train("rnn_scratch", corpus, vocab, params).best_state


def test_a_killed_run_does_not_wedge_the_next_one(workdir, env):
    first = start_run(workdir, env, "first.log")
    wait_for_training(workdir, first, "first.log")
    killed = run_record(workdir)
    assert alive(killed["server_pid"])
    os.kill(first.pid, signal.SIGKILL)
    first.wait()

    start = time.monotonic()
    second = subprocess.run([sys.executable, "-m", "seqlm.cli", "run", "--no-dvc"], cwd=workdir,
                            env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert time.monotonic() - start < 300
    output = second.stdout + second.stderr
    assert f"pid {killed['pid']}" in output and "killed before it ended" in output
    # what the killed run left open is closed: its MLflow runs, its server, its Prefect run
    runs = closed_runs(env, killed)
    for name in ("parent", "rnn_scratch"):          # open when the run was killed
        assert runs[name].info.status == "FAILED", name
        assert "was killed before it ended" in runs[name].data.tags["failure_reason"]
    assert {r.info.status for r in runs.values()} <= {"FAILED", "FINISHED"}   # none left open
    assert not alive(killed["server_pid"])
    assert left_behind(workdir) == []
    # which is why runs on a temporary server send no heartbeats: nothing would watch them,
    # and stopping the heartbeat thread took up to 1 s at the end of every run
    with sqlite3.connect(Path(env["PREFECT_HOME"]) / "prefect.db") as db:
        events = {name for (name,) in db.execute("SELECT DISTINCT event FROM events")}
    assert "prefect.flow-run.Completed" in events and "prefect.flow-run.heartbeat" not in events
    # and the training resumed from the killed run's checkpoint to the straight run's weights
    saved = torch.load(workdir / "models/rnn_scratch/model.pt", weights_only=True)["state_dict"]
    straight = straight_training(workdir)
    assert all(torch.equal(saved[k], straight[k]) for k in straight)


def test_a_killed_seqlm_stage_has_its_mlflow_run_closed_by_the_next_run(workdir, env):
    """What `dvc repro` runs, killed with SIGKILL mid-training: its training run stays RUNNING
    until the next run in the workspace closes it (by the stage run's id in the run record)."""
    from tasks.download import download
    from tasks.preprocess import preprocess

    def stage(*args: str) -> list[str]:
        return [sys.executable, "-m", "seqlm.cli", "stage", *args]
    params = load_params()               # the training's inputs, written here
    download.fn(params)
    preprocess.fn(params)
    training = subprocess.Popen(stage("train_lm", "rnn_scratch"), cwd=workdir, env=env,
                                stdout=open(workdir / "stage.log", "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
    wait_for_training(workdir, training, "stage.log")
    killed = run_record(workdir)
    os.kill(training.pid, signal.SIGKILL)
    training.wait()
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])

    def run_of_the_killed() -> object:
        owner = f"tags.`seqlm.stage_run` = '{killed['stage_run']}'"
        [run] = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                   filter_string=owner)
        return run
    assert run_of_the_killed().info.status == "RUNNING"
    again = subprocess.run(stage("train_lm", "rnn_scratch"), cwd=workdir, env=env,
                           capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    closed = run_of_the_killed()
    assert closed.info.status == "FAILED" and closed.info.run_name == "rnn_scratch"
    assert "was killed before it ended" in closed.data.tags["failure_reason"]
    assert run_record(workdir)["finished"] is True


def refused_while_running(workdir: Path, env: dict[str, str], holder: int) -> None:
    """`seqlm run` and `seqlm stage` in a workspace a run holds: refused at once, by name."""
    for command in (["run", "--no-dvc"], ["stage", "preprocess"]):
        start = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "seqlm.cli", *command], cwd=workdir,
                                env=env, capture_output=True, text=True, timeout=60)
        assert time.monotonic() - start < 15
        assert second.returncode == 2
        [line] = second.stderr.strip().splitlines()
        assert line.startswith("error: WorkspaceBusy: this workspace is in use by "
                               f"pid {holder} (seqlm run, since ")


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_a_signal_stops_training_within_seconds_and_nothing_is_orphaned(workdir, env, how):
    # Long enough for the stop to come while rnn_scratch trains: the flow acts on a signal
    # between its own steps, once seconds after it (and Ctrl-C first tries a second run).
    write_params(workdir, train_lm={**TRAINING, "epochs": (10 if how == "ctrl-c" else 2) * EPOCHS})
    proc = start_run(workdir, env, "run.log")
    wait_for_training(workdir, proc, "run.log")
    if how == "ctrl-c":
        refused_while_running(workdir, env, proc.pid)
    record = run_record(workdir)
    start = time.monotonic()
    if how == "ctrl-c":                    # the terminal signals the whole foreground group
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    stopped_in = time.monotonic() - start
    output = (workdir / "run.log").read_text()
    assert code == (130 if how == "ctrl-c" else 143), output[-3000:]
    assert stopped_in < 20, output[-3000:]
    assert output.strip().splitlines()[-1].startswith("interrupted: the run stopped")
    # nothing orphaned: the temporary server is gone, the MLflow runs are closed as KILLED
    deadline = time.monotonic() + 10
    while alive(record["server_pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(record["server_pid"])
    assert left_behind(workdir) == []
    runs = closed_runs(env, record)
    assert runs["parent"].info.status == runs["rnn_scratch"].info.status == "KILLED"
    assert {r.info.status for r in runs.values()} <= {"KILLED", "FINISHED"}   # none left open
    assert run_record(workdir)["finished"]
    if how == "ctrl-c":
        return                             # the same checkpoints: resuming is tested once
    # the next run resumes and ends where an uninterrupted training ends
    again = subprocess.run([sys.executable, "-m", "seqlm.cli", "run", "--no-dvc"], cwd=workdir,
                           env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming rnn_scratch from epoch" in again.stdout + again.stderr
    saved = torch.load(workdir / "models/rnn_scratch/model.pt", weights_only=True)["state_dict"]
    straight = straight_training(workdir)
    assert all(torch.equal(saved[k], straight[k]) for k in straight)


# --- a full disk -------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A workspace on a 4 MiB tmpfs (tests running as root), or, elsewhere, on the normal disk
    with writes through seqlm.io failing with ENOSPC once `fill()` is called."""
    root = tmp_path / "disk"
    root.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(root)],
        capture_output=True).returncode == 0
    (root / "data" / "mirror").mkdir(parents=True)
    from conftest import REPO
    import shutil
    import yaml
    shutil.copy(REPO / "data/mirror/timemachine.txt", root / "data/mirror")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["download"]["sources"] = ["data/mirror/timemachine.txt"]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(root)
    # the trainings' MLflow store beside the disk: its open database would keep it mounted
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    def fill() -> None:
        if mounted:                        # leave a few KiB: the first big write fails
            free = shutil.disk_usage(root).free
            (root / "filler").write_bytes(b"\0" * max(free - 8192, 0))
        else:
            import errno
            import seqlm.io
            real_open = open

            def full_open(file, mode="r", *args, **kwargs):
                handle = real_open(file, mode, *args, **kwargs)
                if "w" in mode:
                    def write(data):
                        raise OSError(errno.ENOSPC, "No space left on device")
                    handle.write = write
                return handle
            monkeypatch.setattr(seqlm.io, "open", full_open, raising=False)
    yield root, fill
    monkeypatch.undo()
    if mounted:
        os.chdir(tmp_path)
        # A failed stage's traceback (reference cycles) can hold a memory map of a file on the
        # disk (the corpus, np.load(mmap_mode="r")) until the next garbage collection.
        import gc
        gc.collect()
        subprocess.run(["umount", str(root)], check=True)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_a_full_disk_keeps_the_previous_model_folder(small_disk):
    from seqlm.io import StorageError
    from tasks.download import download
    from tasks.preprocess import preprocess
    from tasks.train_lm import train_lm
    root, fill = small_disk
    write_params(root, train_lm={"epochs": 1, "hidden": 64, "models": ["rnn"], "device": "cpu"})
    params = load_params()
    download.fn(params)
    preprocess.fn(params)
    train_lm.fn(params, "rnn")
    before = snapshot(root / "models"), snapshot(root / "checkpoints")
    write_params(root, train_lm={"epochs": 2})
    fill()
    # the checkpoint of epoch 2 is the first big write, then the model folder
    with pytest.raises(StorageError, match=r"^(checkpoints/rnn/\w+\.pt|models/rnn/model\.pt): "
                                           "no space left on the device; the previous version "
                                           "is kept$"):
        train_lm.fn(load_params(), "rnn")
    assert (snapshot(root / "models"), snapshot(root / "checkpoints")) == before
    assert sorted(p.name for p in (root / "models").iterdir()) == ["rnn"]   # no leftovers


def test_a_full_disk_keeps_every_previous_preprocess_output(small_disk):
    from seqlm.io import StorageError
    from tasks.download import download
    from tasks.preprocess import preprocess
    root, fill = small_disk
    params = load_params()
    download.fn(params)
    preprocess.fn(params)
    before = snapshot(root / "data/processed")
    write_params(root, preprocess={"reserved_tokens": ["<bos>"]})   # other ids in every file
    fill()
    with pytest.raises(StorageError, match=r"^data/processed/\S+: no space left on the device; "
                                           "the previous version is kept$"):
        preprocess.fn(load_params())
    assert snapshot(root / "data/processed") == before
    assert sorted(p.name for p in (root / "data").iterdir()) == ["mirror", "processed", "raw"]


def test_a_checkpoint_that_cannot_be_written_still_publishes_the_model(workdir, tmp_path,
                                                                         monkeypatch, caplog):
    """checkpoints/ on a full disk (a 4 KiB tmpfs when root; elsewhere its writes fail with
    ENOSPC), models/ with room: the training ends, warns, and publishes its model."""
    from tasks.download import download
    from tasks.preprocess import preprocess
    from tasks.train_lm import train_lm
    write_params(workdir, train_lm={"epochs": 3, "hidden": 64, "models": ["rnn"],
                                    "checkpoint_every": 1, "device": "cpu"})
    params = load_params()
    download.fn(params)
    preprocess.fn(params)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    full = workdir / "checkpoints"
    full.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(full)],
        capture_output=True).returncode == 0
    if not mounted:
        import errno
        import seqlm.train

        def no_space(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(seqlm.train, "save_torch", no_space)
    try:
        with caplog.at_level("WARNING", logger="seqlm.train"):
            train_lm.fn(params, "rnn")
        assert torch.load(workdir / "models/rnn/model.pt", weights_only=True)["state_dict"]
        warned = [r.getMessage() for r in caplog.records
                  if r.name == "seqlm.train" and "checkpoint not written" in r.getMessage()]
        assert len(warned) == 3 and "no space left" in warned[0].lower(), caplog.text
        assert not list(full.rglob("*.pt")) and not list(full.rglob("*.tmp*"))
    finally:
        if mounted:
            subprocess.run(["umount", str(full)], check=True)


def test_a_full_disk_keeps_the_previous_ngram_tables_and_names_the_table(small_disk):
    import shutil
    from seqlm.io import StorageError
    from tasks.download import download
    from tasks.ngrams import ngrams
    from tasks.preprocess import preprocess
    root, fill = small_disk
    if shutil.disk_usage(root).total > 64 << 20:
        pytest.skip("needs the small tmpfs (root): pyarrow writes past seqlm.io's open")
    params = load_params()
    download.fn(params)
    preprocess.fn(params)
    ngrams.fn(params)
    before = snapshot(root / "data/ngrams")
    write_params(root, ngrams={"max_n": 2})
    fill()
    # pyarrow's error names no file: the stage's does (the table, not its temporary folder)
    with pytest.raises(StorageError, match=r"^data/ngrams/(word|char)_\d\.parquet: no space left "
                                           "on the device; the previous version is kept$"):
        ngrams.fn(load_params())
    assert snapshot(root / "data/ngrams") == before
