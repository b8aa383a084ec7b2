"""The CPU threads torch computes with (`train_lm.cpu_threads`), how many trainings run side by
side on this machine, and which of them yields the cores to the others.

Torch's float sums can differ with the number of threads, so every stage that computes with
torch sets them by use_cpu_threads() in every process that runs it (the flow, `seqlm stage` under
`dvc repro`, a Dask worker), from a param: a result never depends on how or where the stage ran.
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from seqlm.params import GATES, Params

T = TypeVar("T")
BACKGROUND_NICE = 10          # a thread's nice value when it yields the CPU to the others


def training_slots(params: Params) -> int:
    """Language-model trainings at a time: on the CPU as many as the cores hold with
    train_lm.cpu_threads each; on a GPU one (a second would only wait for the first's
    kernels)."""
    if cuda_in_use(params):
        return 1
    return max(1, cores() // params.train_lm.cpu_threads)


def cuda_in_use(params: Params) -> bool:
    """Whether the language models train on a GPU."""
    device = params.train_lm.device
    return device == "cuda" or (device == "auto" and cuda_available())


def side_by_side(params: Params) -> bool:
    """Whether the flow runs language-model trainings side by side (more than one, on the CPU,
    with cores for more than one)."""
    return training_slots(params) > 1 and len(params.train_lm.models) > 1


def use_cpu_threads(params: Params) -> int:
    """Set torch's CPU threads to train_lm.cpu_threads in the calling thread; returns it."""
    import torch
    keep_freed_memory()
    threads = params.train_lm.cpu_threads
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def cuda_available() -> bool:
    """torch.cuda.is_available(), without importing torch (a second) on a Linux machine with no
    NVIDIA driver loaded (no /proc/driver/nvidia), where CUDA cannot be available."""
    if os.name == "posix" and Path("/proc").is_dir() and not Path("/proc/driver/nvidia").exists():
        return False
    import torch
    return torch.cuda.is_available()


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.cache
def keep_freed_memory() -> None:
    """Let glibc keep freed blocks of up to 32 MB in the process (up to 256 MB in all) instead
    of handing them back to the kernel. torch frees and allocates the same MB-sized tensors every
    step (states, gradients, validation inputs); each one returned to the kernel page-faults
    again when it is next written (thousands of faults an epoch, bench/README.md). The same
    numbers, only faster; elsewhere than glibc, nothing changes."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3          # glibc's malloc.h
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 256 << 20)


def release_freed_memory() -> None:
    """Hand the memory this process has freed back to the kernel (glibc's malloc_trim).

    glibc keeps freed blocks below its mmap threshold in the heap of the thread that allocated
    them (one heap per thread), and gives back only what sits at a heap's top. The n-gram tasks
    allocate and free gigabytes in arrays of a few MB on the runner's threads: their freed memory
    stayed resident, and the next task's peak came on top of it (a 1 GB corpus on the local
    runner: 4.6 GB peak RSS without this call after each task, 3.4 GB with it). Elsewhere than
    glibc, nothing happens."""
    malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)


def yields_cores(model: str, params: Params) -> bool:
    """Whether a training on the CPU runs at a lower priority: when trainings run side by side,
    all but the one with the most work per epoch (layers x gates x hidden^2; the first of
    equals) do. The run ends when that one ends, and with every thread at the same priority
    it got only part of a core beside the others; now it keeps its core and the others fill
    what is left.
    Priorities change who waits, not what is computed."""
    p = params.train_lm
    if not side_by_side(params):
        return False
    heaviest = max(p.models, key=lambda m: p.layers(m) * GATES[m] * p.hidden_size(m) ** 2)
    return model != heaviest


def lower_priority(thread: int | None = None) -> None:
    """Lower the CPU priority of the calling thread, or of the thread (or new process) with
    that native id (on Linux a thread has a nice value of its own, and the threads it starts
    inherit it; elsewhere nothing changes). For threads of our own only: it cannot be raised
    back without privileges."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, thread or threading.get_native_id(), BACKGROUND_NICE)


def beside_the_trainings(params: Params) -> None:
    """For a stage off the trainings' path (sine, train_ar, ngrams), which runs while they
    start: its thread yields the CPU while trainings run side by side, so that the longest
    training's process imports torch and starts on a core of its own (seconds of the main job)
    and the stage fills what is left. Only on the local runner, in a flow run: a Dask worker's
    thread runs other tasks next, trainings among them."""
    from prefect.context import TaskRunContext
    if params.execution.task_runner == "local" and side_by_side(params) and TaskRunContext.get():
        lower_priority()


def in_background(fn: Callable[..., T], *args: object) -> T:
    """fn(*args) in a new thread at lower priority, in the caller's context (so that logs reach
    the caller's Prefect task run); returns its result or raises its exception."""
    context = contextvars.copy_context()

    def run() -> T:
        lower_priority()
        return context.run(fn, *args)
    with ThreadPoolExecutor(1, thread_name_prefix="background") as pool:
        return pool.submit(run).result()

