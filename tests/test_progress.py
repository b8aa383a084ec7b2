"""What a person sees while a model trains: a live bar in a terminal, lines in the logs."""
from __future__ import annotations

import fcntl
import logging
import os
import pty
import struct
import subprocess
import sys
import termios

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
