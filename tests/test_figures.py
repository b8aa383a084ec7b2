"""Figures drawn by stages in threads of one process (seqlm.figures)."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd

from seqlm.figures import png
from tasks.train_lm import perplexity_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_figures_drawn_in_threads_at_once_all_draw(tmp_path: Path) -> None:
    """Matplotlib's mathtext parser (the log axis' 10^k labels) is not thread-safe: two
    trainings' perplexity curves drawn at once failed with a ParseException in a real run."""
    history = tmp_path / "history.csv"
    pd.DataFrame({"epoch": np.arange(1, 41), "train_perplexity": np.linspace(20, 2, 40),
                  "val_perplexity": np.linspace(25, 8, 40)}).to_csv(history, index=False)
    start = threading.Barrier(4)
    drawn: list[bytes] = []
    errors: list[BaseException] = []

    def draw() -> None:
        try:
            start.wait()                        # every thread parses the labels at once
            drawn.append(png(lambda: perplexity_figure(pd.read_csv(history), "rnn")))
        except Exception as exc:  # noqa: BLE001 - collected, asserted below
            errors.append(exc)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)                 # threads take turns every few bytecodes
    try:
        threads = [threading.Thread(target=draw) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert len(drawn) == 4 and all(data.startswith(PNG_SIGNATURE) for data in drawn)
    assert len(set(drawn)) == 1                  # the same figure, the same bytes


def test_the_comparison_tells_every_line_apart_and_marks_the_kept_epochs():
    # the n-gram baselines came out in the first model's colour (axhline does not cycle), and
    # nothing showed which epoch each model keeps
    from tasks.evaluate import comparison_figure
    curves = {name: pd.DataFrame({"epoch": [1, 2, 3, 4], "val_perplexity": ppl})
              for name, ppl in [("rnn_scratch", [9.0, 7.0, 8.0, 9.5]),
                                ("gru", [8.0, 7.5, 6.5, 7.0])]}
    table = pd.DataFrame({"model": ["rnn_scratch", "gru", "kneser_ney_3gram", "unigram"],
                          "epochs": [4, 4, None, None], "best_epoch": [2, 3, None, None],
                          "val_ppl_best": [7.0, 6.5, 6.9, 16.9]})
    lines = comparison_figure(curves, table).axes[0].get_lines()
    styles = [(line.get_color(), line.get_linestyle()) for line in lines]
    assert len(set(styles)) == len(lines) == 4, styles
    assert [line.get_label() for line in lines] == [
        "rnn_scratch (kept: epoch 2, 7.00)", "gru (kept: epoch 3, 6.50)",
        "kneser_ney_3gram (6.90)", "unigram (16.90)"]
    assert [line.get_markevery() for line in lines[:2]] == [[1], [2]]
