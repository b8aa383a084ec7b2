"""The CPU threads torch computes with (`train_lm.cpu_threads`), and how many trainings run
side by side on this machine.

Torch's float sums can differ with the number of threads, so every stage that computes with
torch sets them by use_cpu_threads() in every process that runs it (the flow, `seqlm stage` under
`dvc repro`, a Dask worker), from a param: a result never depends on how or where the stage ran.
"""
from __future__ import annotations

import os

import torch

from seqlm.params import Params


def training_slots(params: Params) -> int:
    """Language-model trainings at a time: on the CPU as many as the cores hold with
    train_lm.cpu_threads each; on a GPU one (a second would only wait for the first's
    kernels)."""
    device = params.train_lm.device
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return 1
    return max(1, cores() // params.train_lm.cpu_threads)


def use_cpu_threads(params: Params) -> int:
    """Set torch's CPU threads to train_lm.cpu_threads in the calling thread; returns it."""
    threads = params.train_lm.cpu_threads
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
