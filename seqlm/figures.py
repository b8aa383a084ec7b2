"""Figures as PNG, one drawn at a time in a process.

Stages run in threads of one process, and several draw (n-gram frequencies, the sine plots,
the comparison, each training's perplexity curve for MLflow). Matplotlib is not thread-safe: its
mathtext parser (log-scale tick labels such as 10^1) keeps its state in one object, and two
drawings at once fail with a ParseException. Every figure is built and drawn here, holding
DRAWING.
"""
from __future__ import annotations

import io
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seqlm.io import atomic_path

if TYPE_CHECKING:                  # matplotlib loads with the first figure a stage builds
    from matplotlib.figure import Figure

DRAWING = threading.Lock()


def png(build: Callable[[], Figure], **savefig: Any) -> bytes:
    """The PNG bytes of the figure build() returns (a bare Figure: Agg, no pyplot state)."""
    with DRAWING:
        buffer = io.BytesIO()
        build().savefig(buffer, format="png", **savefig)
    return buffer.getvalue()


def save_png(path: Path | str, build: Callable[[], Figure], **savefig: Any) -> Path:
    """png() written to `path` atomically."""
    data = png(build, **savefig)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)
