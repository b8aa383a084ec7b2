"""Figures drawn by stages in threads of one process (seqlm.figures)."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd

from seqlm.figures import png
from seqlm.stage_logging import perplexity_figure

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
            drawn.append(png(lambda: perplexity_figure(history, "rnn")))
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
