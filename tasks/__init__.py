"""Pipeline stages: one module per stage, each a Prefect task over files (see seqlm/stages.py)."""
from __future__ import annotations

from prefect import Task

from seqlm.params import Params


def task_of(name: str, params: Params) -> Task:
    """The Prefect task of stage `name`, configured from params where that matters."""
    from tasks.download import configured_download
    from tasks.evaluate import evaluate
    from tasks.ngrams import ngrams
    from tasks.preprocess import preprocess
    from tasks.sine import sine
    from tasks.train_ar import train_ar
    from tasks.train_lm import train_lm

    tasks: dict[str, Task] = {
        "download": configured_download(params), "preprocess": preprocess, "ngrams": ngrams,
        "sine": sine, "train_ar": train_ar, "train_lm": train_lm, "evaluate": evaluate}
    return tasks[name]
