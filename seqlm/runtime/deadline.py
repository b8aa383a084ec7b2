"""The time bound of every pipeline run (`execution.timeout_minutes`).

A run still going at its deadline ends TimedOut: the flow stops waiting for its stages, tells the
running ones to stop (a training stops within a batch; its last checkpoint is kept), waits for
them as after any failure (seqlm.interrupt.stop_and_wait), leaves the workspace, and raises
RunTimedOut. Prefect's engine records a TimeoutError raised by a flow as the state TimedOut,
which is what the automations of `seqlm notify` listen for; Prefect's own flow timeout is fixed
where the flow is defined, before its params are read, so the bound is kept here instead.

`auto` bounds a run by several times the work it is configured for: the trainings' floating
point operations (seqlm.runtime.preflight's count) at a rate a slow CPU core reaches, never
less than AUTO_FLOOR_MIN minutes.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from seqlm.params import Params

AUTO_FACTOR = 4                 # the bound: this many times the expected duration
AUTO_FLOOR_MIN = 30.0           # and never less (downloads, n-grams, the stores, a busy machine)
# FLOP/s of a slow CPU core on a recurrent step (this machine's core: ~70 GFLOP/s at hidden 512,
# bench/): the expected duration errs long, and a GPU's far more so, which a bound may.
SLOW_CORE_FLOPS = 20e9
UNKNOWN_CORPUS_CHARS = 170_000  # the chapter's corpus, when no corpus was fetched yet
MAX_WAIT_S = 3600.0             # longest single wait (threading's timeouts are bounded)


class RunTimedOut(TimeoutError):
    """The run passed execution.timeout_minutes (a TimeoutError: Prefect's state TimedOut)."""


def expected_minutes(params: Params) -> float:
    """Minutes the configured trainings take from scratch on a slow core, side by side as the
    run places them (seqlm.threads.training_slots)."""
    from seqlm.runtime.preflight import training_seconds
    from seqlm.threads import training_slots
    lm = params.train_lm
    seconds = [training_seconds(params, model, SLOW_CORE_FLOPS, _corpus_chars(params))
               for model in lm.models]
    slots = min(training_slots(params), len(seconds))
    return max(max(seconds), sum(seconds) / slots) / 60


def _corpus_chars(params: Params) -> int:
    """The corpus's characters, at most its bytes: the last fetched corpus's size."""
    out = Path(params.download.out)
    return out.stat().st_size if out.is_file() else UNKNOWN_CORPUS_CHARS


def bound_minutes(params: Params) -> tuple[float, str]:
    """The run's bound in minutes and how it was set, for the log."""
    minutes = params.execution.timeout_minutes
    if minutes != "auto":
        return float(minutes), f"execution.timeout_minutes = {minutes:g}"
    expected = expected_minutes(params)
    return (max(AUTO_FLOOR_MIN, AUTO_FACTOR * expected),
            f"execution.timeout_minutes = auto: {AUTO_FACTOR} x the {_duration(expected)} the "
            f"trainings take on a slow core, at least {_duration(AUTO_FLOOR_MIN)}")


class Deadline:
    """When the run must end; started when the run starts."""

    def __init__(self, minutes: float, how: str) -> None:
        self.minutes, self.how = minutes, how
        self.at = time.monotonic() + 60 * minutes

    @classmethod
    def of(cls, params: Params, log: logging.Logger | None = None) -> "Deadline":
        minutes, how = bound_minutes(params)
        if log is not None:
            log.info("this run ends TimedOut if still going after %s (%s)",
                     _duration(minutes), how)
        return cls(minutes, how)

    def remaining(self) -> float:
        """Seconds left (0 once passed), at most MAX_WAIT_S: a bound for one wait."""
        return min(max(0.0, self.at - time.monotonic()), MAX_WAIT_S)

    def passed(self) -> bool:
        return time.monotonic() >= self.at

    def timed_out(self, when: str) -> RunTimedOut:
        """The error that ends the run, saying `when` the bound passed ('while train_lm[rnn]
        ran: ...')."""
        return RunTimedOut(f"the run passed its time bound of {_duration(self.minutes)} "
                           f"({self.how}) {when}")

    def check(self, when: str) -> None:
        if self.passed():
            raise self.timed_out(when)


def _duration(minutes: float) -> str:
    if minutes >= 120:
        return f"{minutes / 60:.1f} h"
    return f"{minutes:.3g} min" if minutes >= 1 else f"{minutes * 60:.2g} s"
