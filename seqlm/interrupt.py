"""Ctrl-C and SIGTERM stop a run within seconds, cleanly.

Stages run in worker threads, and Python delivers signals to the main thread only: the handler
sets STOP, which the training loops check between batches, and raises KeyboardInterrupt in the
main thread, which unwinds the flow (MLflow runs closed as KILLED, the temporary Prefect server
stopped at exit). The worker threads see STOP and end within a batch, so the process exits.
"""
from __future__ import annotations

import contextlib
import ctypes
import signal
import threading
from collections.abc import Iterator

STOP = threading.Event()
received: list[int] = []                 # the signals that stopped this process


class Interrupted(RuntimeError):
    """A stage stopped because the run was interrupted (Ctrl-C or SIGTERM)."""


def check() -> None:
    """Raise Interrupted when a stop was requested: call it between units of work."""
    if STOP.is_set():
        raise Interrupted("interrupted")


def _handle(signum: int, _frame: object) -> None:
    STOP.set()
    received.append(signum)
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM set STOP and interrupt the main thread (elsewhere: nothing to do,
    the owner of the main thread handles signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    STOP.clear()
    previous = {sig: signal.signal(sig, _handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def die_with_parent() -> None:
    """In a child process (a server, a training): SIGTERM it when the thread that started it
    ends, its process killed included (Linux; elsewhere nothing changes). Before exec, or first
    thing in a spawned interpreter: the setting does not survive an exec."""
    with contextlib.suppress(OSError, AttributeError):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def exit_code() -> int:
    """The shell's convention: 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + (received[-1] if received else signal.SIGINT)


STOP_WAIT_S = 60             # for the stages still running to stop, after a run failed


def stop_and_wait(futures: list) -> None:
    """Ask every running stage to stop (STOP) and wait for them, up to STOP_WAIT_S: a failed or
    interrupted run ends with nothing of its own still computing."""
    from prefect.futures import wait
    STOP.set()
    try:
        wait(futures, timeout=STOP_WAIT_S)
    finally:
        STOP.clear()
