"""A language-model training in a process of its own: for trainings side by side on the CPU.

In threads of one process, trainings share its interpreter lock with each other and with all
the flow does in Python meanwhile (Prefect's bookkeeping, MLflow logging, the other stages):
each gives it up and waits for it again around every torch call, so the longest training ran
slower beside the other than alone; in a process of its own it keeps its core. (Prefect's
ProcessPoolTaskRunner would put every stage of the flow in a process of its own, each importing
torch and MLflow again; only the trainings side by side gain from one.)

The task stays where it was: the child sends each epoch's metrics and its log records to the
task's thread, which hands them to the callback (progress bar, MLflow) and to the task's
loggers (Prefect), then the result or the error. Ctrl-C and SIGTERM reach the flow's process,
which stops the child the way it stops a thread (within a batch, the last checkpoint kept); the
child dies with it if it is killed.

The cores are shared among the trainings running: train_lm.cpu_threads each while they run side
by side, and the one left alone takes the cores the others gave back from its next epoch on (it
went on alone on one core for a quarter of the main job). Torch's results for these models do
not depend on the thread count (tests/test_train.py), so neither do the weights on the order in
which trainings end.
"""
from __future__ import annotations

import contextlib
import io
import logging
import logging.handlers
import multiprocessing
import pickle
import signal
import threading
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from seqlm import interrupt
from seqlm.params import Params
from seqlm.text import Vocab
from seqlm.threads import cores, lower_priority, yields_cores

if TYPE_CHECKING:          # torch: imported by the training's process first (see _child)
    from seqlm.train import EpochCallback, ProgressCallback, TrainResult

POLL_S = 0.2                 # how often the task's thread looks for a stop request


class CoreShares:
    """The CPU threads granted to each training running in a process of its own: the cores
    divided among them, at least `train_lm.cpu_threads` each. A training's grant is a shared
    integer its process reads at every epoch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: list[tuple[Any, int]] = []   # (grant, train_lm.cpu_threads)

    @contextlib.contextmanager
    def share(self, grant: Any, cpu_threads: int):
        """Count the training of `grant` (a multiprocessing.Value) in while the block runs."""
        entry = (grant, cpu_threads)
        with self._lock:
            self._running.append(entry)
            self._divide()
        try:
            yield
        finally:
            with self._lock:
                self._running.remove(entry)
                self._divide()

    def _divide(self) -> None:
        for grant, cpu_threads in self._running:
            grant.value = max(cpu_threads, cores() // len(self._running))


SHARES = CoreShares()


class ChildTraceback(Exception):
    """The traceback of an error in the training's process (the cause of the error raised)."""


def train_in_own_process(name: str, corpus: np.ndarray, vocab: Vocab, params: Params, *,
                         checkpoint_dir: Path | str | None = None,
                         on_epoch: EpochCallback | None = None,
                         on_progress: ProgressCallback | None = None) -> TrainResult:
    """seqlm.train.train() in a new process: the same arguments, result, callbacks (in this
    thread, in order), log records (to this process's loggers) and errors."""
    context = multiprocessing.get_context("spawn")     # no threads or locks of this process
    receiver, sender = context.Pipe(duplex=False)
    grant = context.Value("i", params.train_lm.cpu_threads, lock=False)   # one writer: SHARES
    # Not a daemon: it may start processes of its own (torch.compile's workers); the finally
    # below ends it, and it dies with this process if this one is killed.
    process = context.Process(
        target=_child, name=f"train-{name}",
        args=(sender, name, corpus, vocab, params, checkpoint_dir,
              logging.getLogger("seqlm").getEffectiveLevel(), grant, on_progress is not None))
    process.start()
    if yields_cores(name, params):       # from its start (the import of torch) on, not only
        lower_priority(process.pid)      # once it trains: the longest training starts first
    sender.close()                                     # EOF once the child's end is closed
    try:
        with SHARES.share(grant, params.train_lm.cpu_threads):
            return _relay(name, process, receiver, on_epoch, on_progress)
    finally:
        if process.is_alive():                         # an error here (the callback, Ctrl-C)
            process.terminate()
        process.join()
        receiver.close()


def _relay(name: str, process: multiprocessing.process.BaseProcess, receiver: Connection,
           on_epoch: EpochCallback | None, on_progress: ProgressCallback | None) -> TrainResult:
    stopping = False
    while True:
        if interrupt.STOP.is_set() and not stopping:
            process.terminate()          # SIGTERM: the child stops within a batch and reports
            stopping = True
        try:
            # Until the child has read its end of the pipe, this process holds a copy of it: a
            # child that dies before (at start-up) is seen by its exit, not by an EOF.
            if not receiver.poll(POLL_S):
                if process.is_alive() or receiver.poll():
                    continue
                raise EOFError
            kind, payload = receiver.recv()
        except EOFError:
            from seqlm.train import TrainingError
            process.join()
            if stopping:
                raise interrupt.Interrupted(f"{name}: interrupted; run again to resume") from None
            raise TrainingError(f"{name}: the training's process ended without a result (exit "
                                f"code {process.exitcode})") from None
        if kind == "epoch":
            if on_epoch is not None:
                on_epoch(*payload)
        elif kind == "progress":
            on_progress(*payload)
        elif kind == "log":
            logging.getLogger(payload.name).handle(payload)
        elif kind == "result":
            return _unpack(payload)
        else:
            error, text = payload
            raise error from ChildTraceback(text)


def _stop_on_sigterm(_signum: int, _frame: object) -> None:
    """Ask the training to stop. Later SIGTERMs (the parent's death signal and its stop can both
    come) are ignored first: a handler run again inside STOP.set() waits forever for the lock
    the interrupted set() holds, and the process was seen left behind so, idle, its parent gone."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    interrupt.STOP.set()


def _child(sender: Connection, name: str, corpus: np.ndarray, vocab: Vocab, params: Params,
           checkpoint_dir: Path | str | None, log_level: int, grant: Any,
           progress: bool) -> None:
    interrupt.die_with_parent()
    # Ctrl-C signals the terminal's whole process group: the flow's process decides, and stops
    # this one with SIGTERM, which ends the training the way Ctrl-C does in a thread.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    lock = threading.Lock()            # the training and the validation thread both send

    def send(kind: str, payload: Any) -> None:
        with lock:
            sender.send((kind, payload))

    from seqlm.train import train
    logger = logging.getLogger("seqlm")
    logger.setLevel(log_level)
    logger.addHandler(logging.handlers.QueueHandler(_Sender(send)))
    logger.propagate = False
    try:
        result = train(name, corpus, vocab, params, checkpoint_dir=checkpoint_dir,
                       on_epoch=lambda epoch, metrics: send("epoch", (epoch, metrics)),
                       threads=lambda: grant.value,
                       on_progress=(lambda step, ppl: send("progress", (step, ppl)))
                       if progress else None)
        send("result", _pack(result))
    except BaseException as exc:  # noqa: BLE001 - every error goes back to the task
        with contextlib.suppress(OSError):     # the flow's process is gone: nobody to tell
            send("error", (_portable(exc), traceback.format_exc()))
    finally:
        sender.close()


class _Sender:
    """The queue a QueueHandler puts the prepared records in (message formatted, args gone)."""

    def __init__(self, send: Callable[[str, Any], None]) -> None:
        self.send = send

    def put_nowait(self, record: logging.LogRecord) -> None:
        self.send("log", record)


def _portable(exc: BaseException) -> BaseException:
    """The exception itself where it survives pickling; otherwise its type and message."""
    try:
        return pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any pickling failure
        from seqlm.train import TrainingError
        return TrainingError(f"{type(exc).__name__}: {exc}")


def _pack(result: TrainResult) -> bytes:
    """The result as torch.save bytes (plain tensors: nothing shared with the child, which
    exits right after sending it)."""
    import torch
    buffer = io.BytesIO()
    torch.save({"model": result.model.state_dict(), "best_state": result.best_state,
                "config": result.config, "history": result.history,
                "device": str(result.device), "resumed_from": result.resumed_from,
                "stopped_early": result.stopped_early,
                "validation_digest": result.validation_digest}, buffer)
    return buffer.getvalue()


def _unpack(data: bytes) -> TrainResult:
    import torch

    from seqlm.train import TrainResult, model_of
    saved = torch.load(io.BytesIO(data), weights_only=True)
    model = model_of(saved["config"])
    model.load_state_dict(saved["model"])
    return TrainResult(model, saved["best_state"], saved["config"], saved["history"],
                       torch.device(saved["device"]), saved["resumed_from"],
                       saved["stopped_early"], saved["validation_digest"])
