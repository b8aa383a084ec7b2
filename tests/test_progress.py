"""What a person sees while a model trains: a live bar in a terminal, lines in the logs."""
from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time

import pytest

from conftest import write_params
from seqlm.params import load_params
from tasks.download import download
from tasks.preprocess import preprocess


@pytest.fixture
def preprocessed(workdir):
    write_params(workdir, train_lm={"epochs": 6, "hidden": 16, "checkpoint_every": 3,
                                    "models": ["rnn"], "device": "cpu"})
    params = load_params()
    download.fn(params)
    preprocess.fn(params)
    return workdir


def test_a_terminal_shows_a_live_progress_bar(preprocessed):
    main, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 120 columns
    proc = subprocess.Popen([sys.executable, "-m", "seqlm.cli", "stage", "train_lm", "rnn"],
                            cwd=preprocessed, stdin=secondary, stdout=secondary,
                            stderr=secondary, close_fds=True)
    os.close(secondary)
    output = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:                     # the terminal closed: the process has ended
            break
        if not chunk:
            break
        output += chunk
    assert proc.wait(timeout=120) == 0, output.decode(errors="replace")
    text = output.decode(errors="replace")
    assert "train_lm[rnn]" in text and "6/6" in text and ("epoch/s" in text or "s/epoch" in text)
    assert "train_ppl=" in text and "val_ppl=" in text and "tok_s=" in text
    assert "\r" in text                      # redrawn in place, not one line per epoch
    assert "UserWarning" not in text


def test_the_logs_get_a_line_every_checkpoint_and_a_summary(preprocessed, caplog):
    from tasks.train_lm import train_lm
    with caplog.at_level(logging.INFO, logger="seqlm"):
        train_lm.fn(load_params(), "rnn")
    lines = [r.getMessage() for r in caplog.records if r.name == "seqlm.train"]
    assert [line.split(":")[0] for line in lines[:2]] == ["rnn epoch 3", "rnn epoch 6"]
    assert "tokens/s" in lines[0] and "best" in lines[0]
    assert lines[2].startswith("rnn: 6 epochs (6 this run) in ")
    assert "best val ppl" in lines[2] and "final epoch: train ppl" in lines[2]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_resumed_training_gets_its_eta_from_its_own_pace(monkeypatch):
    # Resumed at epoch 250 of 500 (or started in a process of its own), the first report used
    # to count every earlier epoch as done in this run's first seconds: ETA ~0 for minutes.
    from tasks.train_lm import progress_bar
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    metrics = {"train_perplexity": 2.0, "val_perplexity": 3.0, "tokens_per_s": 1000.0}
    with progress_bar("rnn", 500) as (report, _):
        time.sleep(0.3)                     # the process's start-up and the first epoch
        report(251, metrics)
        start = time.monotonic()
        time.sleep(0.3)                     # one epoch (longer on a busy machine)
        report(252, metrics)
        epoch_s = time.monotonic() - start
        frame = terminal.getvalue().split("\r")[-1]
    eta = re.search(r"252/500 \[\d\d:\d\d<(\d\d):(\d\d)", frame)
    assert eta, frame
    # 248 epochs to go at this one's pace (the bug said 00:00)
    assert 0.9 * 248 * epoch_s <= 60 * int(eta[1]) + int(eta[2]) <= 1.1 * 248 * epoch_s + 1, frame


def test_a_log_line_clears_the_progress_bars_and_redraws_them_after_it():
    from prefect.logging.handlers import PrefectConsoleHandler
    from tqdm import tqdm

    from seqlm.cli import _logs_between_bars
    terminal = io.StringIO()
    handler = PrefectConsoleHandler(stream=terminal)
    _logs_between_bars(handler)
    bar = tqdm(total=10, desc="train_lm[rnn]", file=terminal, ncols=80)
    try:
        bar.update(3)
        terminal.seek(0)
        terminal.truncate()
        handler.emit(logging.LogRecord("seqlm.train", logging.INFO, __file__, 1,
                                       "rnn epoch 3: checkpoint", None, None))
        written = terminal.getvalue()
    finally:
        bar.close()
    # the bar's line is blanked first, the log line written on it, then the bar drawn again
    assert written.startswith("\r") and written.index("rnn epoch 3: checkpoint") < \
        written.rindex("train_lm[rnn]"), repr(written)

