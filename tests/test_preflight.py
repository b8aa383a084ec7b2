"""Errors found before any stage runs (the machine) or right after preprocess (the corpus),
each one line naming the params key."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_params
from seqlm.params import Params, load_params
from seqlm.runtime.preflight import (PreflightError, check_corpus, check_dask_address,
                                     check_dvc_lock, check_machine)
from seqlm.text import Vocab


def params_with(root: Path, **sections) -> Params:
    write_params(root, **sections)
    return load_params()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu(workdir):
    with pytest.raises(PreflightError, match=r"^train_lm.device = 'cuda' but torch .* sees no "
                                             "CUDA GPU"):
        check_machine(params_with(workdir, train_lm={"device": "cuda"}))


def test_a_dask_address_nothing_answers_on(workdir):
    import socket
    with socket.socket() as sock:       # a port just freed: refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    params = params_with(workdir, execution={"task_runner": "dask",
                                             "dask_address": f"tcp://127.0.0.1:{port}"})
    with pytest.raises(PreflightError, match=rf"^execution.dask_address = 'tcp://127.0.0.1:"
                                             rf"{port}': no Dask scheduler answers there "
                                             r"\(Connection refused\); start `dask scheduler`"):
        check_machine(params)
    with pytest.raises(PreflightError, match=r"^execution.dask_address = 'nowhere': expected "
                                             r"tcp://HOST:PORT"):
        check_dask_address("nowhere")


def test_a_flow_run_checks_the_dask_address_before_its_runner_connects(workdir, prefect_server):
    # what a Prefect worker or `seqlm schedule` runs: the flow itself, without `seqlm run`
    from flows.pipeline import pipeline
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    write_params(workdir, execution={"task_runner": "dask",
                                     "dask_address": f"tcp://127.0.0.1:{port}"})
    with pytest.raises(PreflightError, match=r"^execution.dask_address = "):
        pipeline(params_file="params.yaml", record_dvc=False)


@pytest.mark.parametrize("text", [
    "schema: '2.0'\nstages:\n  download:\n    cmd: [x", "", "- a\n",
    # cut at the end of a line: still YAML, no longer what DVC reads
    "schema: '2.0'\nstages:\n  download:\n    cmd: seqlm stage download\n    deps:\n"])
def test_a_damaged_dvc_lock(tmp_path, text):
    lock = tmp_path / "dvc.lock"
    lock.write_text(text)
    with pytest.raises(PreflightError, match=rf"^{lock}: not a valid DVC lock file .*; remove it "
                                             r"\(the run writes it again"):
        check_dvc_lock(lock)
    check_dvc_lock(tmp_path / "absent.lock")
    valid = tmp_path / "valid.lock"
    valid.write_text(text_of_a_lock_dvc_writes())
    check_dvc_lock(valid)


def text_of_a_lock_dvc_writes() -> str:
    entry = "    - path: {}\n      hash: md5\n      md5: 6f5902ac237024bdd0c176cb93063dc4\n" \
            "      size: 12\n"
    return ("schema: '2.0'\nstages:\n  download:\n    cmd: seqlm stage download\n    deps:\n"
            + entry.format("tasks/download.py") + "    params:\n      params.yaml:\n"
            "        download.checksum: null\n    outs:\n" + entry.format("data/raw/x.txt"))


def test_download_out_naming_a_folder(workdir):
    (workdir / "data").mkdir(exist_ok=True)
    with pytest.raises(PreflightError, match=r"^download.out = 'data' is a folder"):
        check_machine(params_with(workdir, download={"out": "data"}))


@pytest.mark.parametrize("settings, key", [
    ({"hidden": 1_000_000}, "train_lm.hidden = 1000000"),
    ({"hidden_scratch": 2_000_000}, "train_lm.hidden_scratch = 2000000"),
    ({"num_steps": 1_000_000}, "train_lm.batch_size x train_lm.num_steps = 32 x 1000000")])
def test_a_model_too_big_for_the_memory(workdir, settings, key):
    with pytest.raises(PreflightError, match=rf"^{key}: training \w+ needs about [\d,.]+ GiB, "
                                             "and this machine has"):
        check_machine(params_with(workdir, train_lm=settings))


def test_the_defaults_pass(workdir):
    check_machine(load_params())


@pytest.fixture(scope="module")
def corpus() -> tuple[np.ndarray, dict[str, Vocab]]:
    from conftest import REPO
    from seqlm.text import read_lines, tokenize
    lines = read_lines(REPO / "data/mirror/timemachine.txt")
    vocabs = {level: Vocab(tokenize(lines, level)) for level in ("word", "char")}
    ids = np.asarray([vocabs["char"][c] for line in lines for c in line], dtype=np.int32)
    return ids, vocabs


@pytest.mark.parametrize("sections, message", [
    ({"preprocess": {"train_tokens": 170_000}}, "^preprocess.train_tokens \\+ preprocess.val_tokens "
                                                "= 170000 \\+ 5000 exceeds the corpus of 170580"),
    ({"preprocess": {"train_tokens": None, "val_tokens": 170_580}},
     "^preprocess.val_tokens = 170580 leaves no training text"),
    ({"train_lm": {"num_steps": 100_000}}, "^train_lm.batch_size = 32 x train_lm.num_steps = "
                                           "100000 do not fit the training split of 10000"),
    ({"train_lm": {"batch_size": 5_000}}, "^train_lm.batch_size = 5000 x"),
])
def test_what_does_not_fit_the_corpus(workdir, corpus, sections, message):
    ids, vocabs = corpus
    with pytest.raises(PreflightError, match=message) as info:
        check_corpus(params_with(workdir, **sections), ids, vocabs)
    assert "\n" not in str(info.value)


def test_any_ngram_order_fits_any_vocabulary(workdir, corpus):
    """Orders whose keys pass 63 bits (4580**10 words) are counted, not refused."""
    ids, vocabs = corpus
    check_corpus(params_with(workdir, ngrams={"max_n": 10}, evaluate={"ngram_orders": [12]}),
                 ids, vocabs)


def test_prefix_characters_the_corpus_never_uses(workdir):
    vocab = Vocab(list("abc def"))
    ids = np.asarray(vocab[list("abc def" * 3000)], dtype=np.int32)
    with pytest.raises(PreflightError, match="^evaluate.prefixes: 'Time Traveller!' has "
                                             "characters the corpus never uses: 'ilmrtv'"):
        check_corpus(params_with(workdir, evaluate={"prefixes": ["Time Traveller!"]}), ids,
                     {"char": vocab, "word": Vocab("abc def".split())})
    # what normalisation turns into known characters is fine: 'Über' reads as ' ber'
    check_corpus(params_with(workdir, evaluate={"prefixes": ["Bed, fade!"]}), ids,
                 {"char": vocab, "word": Vocab("abc def".split())})


@pytest.mark.slow
def test_the_flow_stops_after_preprocess_before_any_training(workdir, prefect_server,
                                                             monkeypatch):
    from flows.pipeline import pipeline
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    write_params(workdir, train_lm={"num_steps": 20_000})
    with pytest.raises(PreflightError, match="^train_lm.batch_size = 32 x train_lm.num_steps"):
        pipeline(params_file="params.yaml", record_dvc=False)
    assert (workdir / "data/processed/corpus_char.npy").exists()
    # no language model trained (the sine MLP and the n-grams do not read the batch shape)
    assert not list((workdir / "models").glob("rnn*")) and not (workdir / "checkpoints").exists()


def test_a_training_of_hours_is_announced_with_its_estimate(workdir, caplog):
    import logging
    from seqlm.runtime.preflight import warn_long_trainings
    log = logging.getLogger("test.preflight")
    with caplog.at_level("WARNING", logger="test.preflight"):
        warn_long_trainings(params_with(workdir, train_lm={"device": "cpu"}), log)
        assert caplog.records == []                   # the chapter's two: minutes
        warn_long_trainings(params_with(workdir, train_lm={"num_layers": 1000, "models": ["rnn"]}),
                            log)
    [warning] = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(r"train_lm.num_layers = 1000: training rnn from scratch takes about "
                        r"[\d.]+ h on this machine's CPU \(~[\d,]+ tokens/s, 500 epochs\), "
                        r"checkpoints of ~1,00\d MiB", warning), warning


def test_checkpoints_that_cannot_fit_the_disk_are_refused(workdir):
    import os
    import subprocess
    folder = workdir / "checkpoints"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                                            str(folder)], capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        with pytest.raises(PreflightError, match=r"^train_lm.hidden_scratch = 512: the "
                                                 r"checkpoints and models of this run need about "
                                                 r"0.0\d GiB, and the disk of checkpoints/ has 0.00 GiB free"):
            check_machine(params_with(workdir, train_lm={"device": "cpu"}))
        check_machine(params_with(workdir, train_lm={"device": "cpu", "hidden_scratch": 32,
                                                     "hidden": 32}))
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_training_task_starts_its_process_before_importing_torch(workdir):
    # The checks of the preprocessed corpus and the training task up to its process's start
    # import neither torch nor matplotlib: in the flow's process they waited seconds for the
    # imports of the stages beside them, ahead of the longest training's first epoch.
    from tasks.download import download
    from tasks.preprocess import preprocess
    download.fn(load_params())
    preprocess.fn(load_params())
    script = ("import sys; from seqlm.params import load_params; "
              "from seqlm.runtime.preflight import check_preprocessed; "
              "check_preprocessed(load_params()); "
              "import tasks.train_lm, seqlm.runtime.own_process; "
              "print(sorted({'torch', 'matplotlib'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split("\n")[-2] == "[]"
