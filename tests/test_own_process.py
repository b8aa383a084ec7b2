"""A training in a process of its own (seqlm.runtime.own_process): the same training, callbacks, logs,
errors and stops as in a thread, and no process left behind."""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from seqlm import interrupt
from seqlm.runtime.own_process import ChildTraceback, CoreShares, train_in_own_process
from seqlm.threads import cores
from seqlm.train import HISTORY_COLUMNS, TrainingError, train
from tasks.train_lm import trainer
from test_train import assert_same_weights, char_corpus, make_params, weights


@pytest.fixture(scope="module")
def data():
    return char_corpus()


@pytest.fixture
def stop_cleared():
    yield
    interrupt.STOP.clear()


def small(**train_lm: object):
    return make_params(**{"models": ["rnn_scratch"], "hidden_scratch": 64, "epochs": 6,
                          "checkpoint_every": 3, **train_lm})


def test_the_training_is_the_one_in_a_thread(data, tmp_path, caplog):
    corpus, vocab = data
    params = small()
    seen = []
    with caplog.at_level(logging.INFO, logger="seqlm"):
        own = train_in_own_process("rnn_scratch", corpus, vocab, params,
                                   checkpoint_dir=tmp_path / "own",
                                   on_epoch=lambda epoch, metrics: seen.append((epoch, metrics)))
    here = train("rnn_scratch", corpus, vocab, params, checkpoint_dir=tmp_path / "here")

    def rows(result):
        return [{k: row[k] for k in HISTORY_COLUMNS} for row in result.history]
    assert rows(own) == rows(here)
    assert_same_weights(own.best_state, here.best_state)
    assert_same_weights(weights(own.model), weights(here.model))
    assert (own.config, own.device, own.resumed_from, own.stopped_early,
            own.validation_digest) == (here.config, here.device, 0, False,
                                       here.validation_digest)
    # the callback saw every epoch in order, with the history's numbers
    assert [epoch for epoch, _ in seen] == [1, 2, 3, 4, 5, 6]
    assert [m["val_perplexity"] for _, m in seen] == [r["val_perplexity"] for r in here.history]
    # the child's log records reach this process's loggers
    lines = [r.getMessage() for r in caplog.records if r.name == "seqlm.train"]
    assert any(line.startswith("rnn_scratch epoch 3: train ppl") for line in lines), lines
    assert any(line.startswith("rnn_scratch: 6 epochs (6 this run)") for line in lines), lines
    assert (tmp_path / "own").is_dir() and list((tmp_path / "own").glob("*.pt"))
    assert multiprocessing.active_children() == []


def test_an_error_comes_back_with_its_type_message_and_traceback(data):
    corpus, vocab = data
    params = small(lr=1e6)                              # diverges in the first epoch
    with pytest.raises(TrainingError) as in_thread:
        train("rnn_scratch", corpus, vocab, params)
    with pytest.raises(TrainingError) as in_child:
        train_in_own_process("rnn_scratch", corpus, vocab, params)
    assert str(in_child.value) == str(in_thread.value)
    assert "diverged at epoch 1" in str(in_child.value)
    cause = in_child.value.__cause__
    assert isinstance(cause, ChildTraceback) and "_check_finite" in str(cause)
    assert multiprocessing.active_children() == []


def test_a_stop_ends_the_child_within_a_batch_and_keeps_its_checkpoint(data, tmp_path,
                                                                       stop_cleared):
    corpus, vocab = data

    def stop_at_epoch_4(epoch: int, _metrics: dict) -> None:
        if epoch == 4:
            interrupt.STOP.set()                        # what Ctrl-C / SIGTERM set in the flow
    start = time.monotonic()
    with pytest.raises(interrupt.Interrupted, match=r"rnn_scratch: interrupted in epoch \d+; "
                                                    r"checkpoint at epoch \d+ kept"):
        train_in_own_process("rnn_scratch", corpus, vocab, small(epochs=500, checkpoint_every=2),
                             checkpoint_dir=tmp_path, on_epoch=stop_at_epoch_4)
    assert time.monotonic() - start < 60                 # not the 500 epochs
    assert multiprocessing.active_children() == []


def test_a_child_that_dies_is_an_error_naming_the_training(data):
    corpus, vocab = data

    def kill_the_child(epoch: int, _metrics: dict) -> None:
        if epoch == 2:
            [child] = multiprocessing.active_children()
            os.kill(child.pid, signal.SIGKILL)
    with pytest.raises(TrainingError, match=r"^rnn_scratch: the training's process ended "
                                            r"without a result \(exit code -9\)$"):
        train_in_own_process("rnn_scratch", corpus, vocab, small(epochs=500),
                             on_epoch=kill_the_child)


CHILD_OF_A_KILLED_PROCESS = """
from seqlm.runtime.own_process import train_in_own_process
from test_train import char_corpus, make_params
import multiprocessing

def report(epoch, metrics):
    if epoch == 1:
        print(multiprocessing.active_children()[0].pid, flush=True)

if __name__ == "__main__":
    corpus, vocab = char_corpus()
    params = make_params(models=["rnn_scratch"], hidden_scratch=64, epochs=10_000)
    train_in_own_process("rnn_scratch", corpus, vocab, params, on_epoch=report)
"""


def test_the_child_dies_with_the_process_that_started_it(tmp_path):
    """Killed mid-run, the parent leaves no training behind (the child gets SIGTERM from the
    kernel and stops within a batch; failing that, its next send finds the pipe broken)."""
    script = tmp_path / "killed.py"
    script.write_text(CHILD_OF_A_KILLED_PROCESS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(__file__), *filter(None, [os.environ.get("PYTHONPATH")])])}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=env)
    child = int(parent.stdout.readline())
    assert psutil.pid_exists(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 20
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the training's process outlived its parent"
        time.sleep(0.1)


def test_only_trainings_side_by_side_on_the_local_runner_get_a_process_of_their_own():
    two = dict(models=["rnn_scratch", "rnn"])
    side_by_side = make_params(**two, cpu_threads=1)
    assert trainer(side_by_side) is (train_in_own_process if cores() > 1 else train)
    alone = trainer(make_params(models=["rnn"], cpu_threads=1))   # in this process, every core
    assert alone.func is train and alone.keywords == {"threads": cores}
    assert trainer(make_params(**two, cpu_threads=cores())) is train   # one slot
    on_dask = side_by_side.model_copy(update={"execution": side_by_side.execution.model_copy(
        update={"task_runner": "dask"})})
    assert trainer(on_dask) is train


def test_the_training_left_alone_takes_the_cores_the_others_gave_back():
    class Grant:
        value = 0
    shares, first, second = CoreShares(), Grant(), Grant()
    with shares.share(first, 1):
        assert first.value == cores()
        with shares.share(second, 1):
            assert first.value == second.value == max(1, cores() // 2)
        assert first.value == cores()
    with shares.share(first, 2), shares.share(second, 2):
        assert first.value == second.value == max(2, cores() // 2)


def test_what_runs_beside_the_longest_training_yields_the_cpu(prefect_server, data, tmp_path):
    """A stage off the trainings' path, in a task run on the local runner, runs at a lower
    priority while trainings run side by side; outside a flow run nothing changes."""
    from prefect import flow, task

    from seqlm.threads import BACKGROUND_NICE, beside_the_trainings

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    @task
    def side_stage(params) -> int:
        beside_the_trainings(params)
        return nice()

    @flow
    def run(params) -> int:
        return side_stage(params)
    params = make_params(models=["rnn_scratch", "rnn"], cpu_threads=1)
    if cores() < 2:
        pytest.skip("trainings run side by side only with 2 cores or more")
    assert run(params) == BACKGROUND_NICE
    before = nice()
    beside_the_trainings(params)              # outside a task run (`seqlm stage`): unchanged
    assert nice() == before


def test_a_run_limits_its_trainings_only_where_the_limit_can_hold_one_back():
    from seqlm.runtime.session import slots_can_bind
    assert not slots_can_bind(make_params(models=["rnn"]))
    assert slots_can_bind(make_params(models=["rnn", "gru"], cpu_threads=cores()))   # 1 slot
    assert slots_can_bind(make_params(models=["rnn", "gru", "lstm"], cpu_threads=1)) == \
        (cores() < 3)
    on_dask = make_params(models=["rnn", "gru"], cpu_threads=cores())
    on_dask = on_dask.model_copy(update={"execution": on_dask.execution.model_copy(
        update={"task_runner": "dask"})})
    assert not slots_can_bind(on_dask)                     # one GPU resource per training
