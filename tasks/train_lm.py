"""train_lm: train one character language model and write models/<model>/."""
from __future__ import annotations

import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from prefect import task

from seqlm.generate import HISTORY_FILE, META_FILE, MODEL_FILE, VOCAB_FILE
from seqlm.io import atomic_path, write_csv, write_json
from seqlm.models import check_model_name
from seqlm.params import Params
from seqlm.stages import CORPUS, STAGE_BY_NAME, VOCAB, Stage
from seqlm.text import Vocab
from seqlm.train import CHECKPOINTS, HISTORY_COLUMNS, TrainResult, train


@task(name="train_lm", tags=["gpu"])
def train_lm(params: Params, model: str,
             on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> list[Path]:
    """Train `model` (resuming checkpoints/<model>/last.pt when it holds the same run) and write
    model.pt, vocab.parquet, history.csv and meta.json into models/<model>/."""
    check_model_name(model)
    for path in (CORPUS["char"], VOCAB["char"]):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: not found (run the preprocess stage first)")
    corpus = np.load(CORPUS["char"])
    vocab = Vocab.load(VOCAB["char"])
    result = train(model, corpus, vocab, params, checkpoint_dir=CHECKPOINTS / model,
                   on_epoch=on_epoch)
    out = Path(STAGE.paths(params, item=model)["outs"][0])
    return write_model_dir(out, result, vocab, params)


def write_model_dir(out: Path, result: TrainResult, vocab: Vocab, params: Params) -> list[Path]:
    config = result.config
    build = {"name": config["model"], "vocab_size": config["vocab_size"],
             "hidden": config["hidden"], "num_layers": config["num_layers"]}
    with atomic_path(out / MODEL_FILE) as tmp:
        # On the CPU, so that a GPU-trained model loads anywhere.
        state_dict = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
        torch.save({"state_dict": state_dict, "config": build,
                    "vocab_fingerprint": vocab.fingerprint()}, tmp)
    vocab.save(out / VOCAB_FILE)                 # the folder is self-contained
    history = pd.DataFrame(result.history, columns=list(HISTORY_COLUMNS))
    write_csv(out / HISTORY_FILE, history)
    last = result.history[-1]
    write_json(out / META_FILE, {
        "model": config["model"], **{k: build[k] for k in ("vocab_size", "hidden", "num_layers")},
        "vocab_fingerprint": vocab.fingerprint(),
        "device": str(result.device), "torch": torch.__version__,
        "python": platform.python_version(),
        "epochs": int(last["epoch"]), "resumed_from_epoch": result.resumed_from,
        "final_train_perplexity": last["train_perplexity"],
        "final_val_perplexity": last["val_perplexity"],
        "tokens_per_s": float(history["tokens_per_s"].mean()),      # mean over the epochs
        "wall_s": result.wall_s,
        "params": {"seed": params.seed,
                   "preprocess": params.preprocess.model_dump(
                       mode="json", include={"train_tokens", "val_tokens"}),
                   "train_lm": params.train_lm.model_dump(mode="json")},
        "run_config": config,
    })
    return [out / name for name in (MODEL_FILE, VOCAB_FILE, HISTORY_FILE, META_FILE)]


STAGE: Stage = STAGE_BY_NAME["train_lm"]
