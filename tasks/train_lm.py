"""train_lm: train one character language model and write models/<model>/."""
from __future__ import annotations

import platform
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from prefect import task
from tqdm import tqdm

from seqlm.generate import HISTORY_FILE, META_FILE, MODEL_FILE, VOCAB_FILE
from seqlm.io import publish, save_torch, write_csv, write_json
from seqlm.models import check_model_name
from seqlm.own_process import train_in_own_process
from seqlm.params import Params
from seqlm.stages import CORPUS, STAGE_BY_NAME, VOCAB, Stage
from seqlm.text import Vocab
from seqlm.threads import side_by_side
from seqlm.train import CHECKPOINTS, HISTORY_COLUMNS, EpochCallback, TrainResult, train


@task(name="train_lm", tags=["training"])
def train_lm(params: Params, model: str,
             on_epoch: EpochCallback | None = None) -> list[Path]:
    """Train `model` (resuming its checkpoint in checkpoints/<model>/ when one holds the same
    run) and write model.pt (the best epoch's weights), vocab.parquet, history.csv and
    meta.json into models/<model>/."""
    check_model_name(model)
    for path in (CORPUS["char"], VOCAB["char"]):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: not found (run the preprocess stage first)")
    corpus = np.load(CORPUS["char"])
    vocab = Vocab.load(VOCAB["char"])
    with progress_bar(model, params.train_lm.epochs, on_epoch) as report:
        result = trainer(params)(model, corpus, vocab, params,
                                 checkpoint_dir=CHECKPOINTS / model, on_epoch=report)
    out = Path(STAGE.paths(params, item=model)["outs"][0])
    return write_model_dir(out, result, vocab, params)


def trainer(params: Params) -> Callable[..., TrainResult]:
    """seqlm.train.train, or, for trainings side by side on the local runner, the same in a
    process of its own (seqlm.own_process); on Dask each already runs in a worker process."""
    if params.execution.task_runner == "local" and side_by_side(params):
        return train_in_own_process
    return train


@contextlib.contextmanager
def progress_bar(model: str, epochs: int, on_epoch: EpochCallback | None,
                 ) -> Iterator[EpochCallback]:
    """A live progress bar in the terminal (epoch, train/val perplexity, tokens/s, ETA) around
    `on_epoch`; none when the output is not a terminal (logs, CI)."""
    bar = tqdm(total=epochs, desc=f"train_lm[{model}]", unit="epoch", disable=None,
               dynamic_ncols=True, leave=True)
    first = True

    def report(epoch: int, metrics: dict[str, float]) -> None:
        nonlocal first
        if first:
            # The pace counts from the first epoch reported, not from the bar's start: epochs
            # resumed from a checkpoint (hundreds at once) and the start-up of a training's
            # process gave a rate, and an ETA, wrong for as many epochs as tqdm smooths over
            # (minutes, when epochs are long). The elapsed time stays the whole stage's.
            first = False
            bar.initial = bar.n = bar.last_print_n = epoch
        bar.set_postfix(train_ppl=f"{metrics['train_perplexity']:.3f}",
                        val_ppl=f"{metrics['val_perplexity']:.3f}",
                        tok_s=f"{metrics['tokens_per_s']:,.0f}", refresh=False)
        bar.update(epoch - bar.n)                # redraws, with this epoch's numbers
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    try:
        yield report
    finally:
        bar.close()


def write_model_dir(out: Path, result: TrainResult, vocab: Vocab, params: Params) -> list[Path]:
    """models/<model>/: the best-validation epoch's weights, the vocabulary, the per-epoch
    history and meta.json, published together (a failed write leaves the previous folder).
    Only what the same params, code and machine reproduce byte for byte: timings and resume
    points go to MLflow and the logs."""
    config = result.config
    build = {k: config[k] for k in ("vocab_size", "hidden", "num_layers", "dropout")}
    build["name"] = config["model"]
    last, best = result.history[-1], result.best
    # On the CPU, so that a GPU-trained model loads anywhere.
    state_dict = {k: v.detach().cpu() for k, v in result.best_state.items()}
    with publish() as outputs:
        folder = outputs.folder(out)
        save_torch(folder / MODEL_FILE, {"state_dict": state_dict, "config": build,
                                         "vocab_fingerprint": vocab.fingerprint()})
        vocab.save(folder / VOCAB_FILE)          # the folder is self-contained
        write_csv(folder / HISTORY_FILE,
                  pd.DataFrame(result.history, columns=list(HISTORY_COLUMNS)))
        write_json(folder / META_FILE, {
            "model": config["model"],
            **{k: build[k] for k in ("vocab_size", "hidden", "num_layers")},
            "vocab_fingerprint": vocab.fingerprint(),
            "device": str(result.device), "torch": torch.__version__,
            "python": platform.python_version(),
            "epochs": int(last["epoch"]), "stopped_early": result.stopped_early,
            "final_train_perplexity": last["train_perplexity"],
            "final_val_perplexity": last["val_perplexity"],
            "best_epoch": int(best["epoch"]),
            "best_train_perplexity": best["train_perplexity"],
            "best_val_perplexity": best["val_perplexity"],
            "validation_digest": result.validation_digest,
            "params": {"seed": params.seed,
                       "preprocess": params.preprocess.model_dump(
                           mode="json", include={"train_tokens", "val_tokens"}),
                       "train_lm": params.train_lm.model_dump(mode="json")},
            "run_config": config,
        })
    return [out / name for name in (MODEL_FILE, VOCAB_FILE, HISTORY_FILE, META_FILE)]


STAGE: Stage = STAGE_BY_NAME["train_lm"]
