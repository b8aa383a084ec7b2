"""train_lm: train one character language model, write models/<model>/, log and register it.

torch, pandas and matplotlib are imported in the functions that use them: a run that finds
the stage cached never loads them (bench/main_job.py, the re-run with nothing changed)."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from seqlm import tracking
from seqlm.io import publish, save_torch, write_csv, write_json
from seqlm.params import Params, check_model_name
from seqlm.runtime.preflight import check_preprocessed
from seqlm.runtime.records import Record, stage_task
from seqlm.runtime.session import training_slot
from seqlm.threads import cores, cuda_in_use, side_by_side
from seqlm.stages import CORPUS, STAGE_BY_NAME, VOCAB
from seqlm.text import markdown_code

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from matplotlib.figure import Figure

    from seqlm.text import Vocab
    from seqlm.train import EpochCallback, ProgressCallback, TrainResult

STAGE = STAGE_BY_NAME["train_lm"]
CHECKPOINTS = Path("checkpoints")        # outside the DVC outs: `dvc repro` deletes outs first


@stage_task("train_lm")
def train_lm(params: Params, model: str) -> Record:
    """Train `model` (resuming its checkpoint in checkpoints/<model>/ when one holds the same
    run), write model.pt (the best epoch's weights), vocab.parquet, history.csv and meta.json
    into models/<model>/, and log the training as its MLflow run, registering the kept model."""
    from seqlm.text import Vocab
    check_model_name(model)
    check_preprocessed(params)
    corpus = np.load(CORPUS["char"])
    vocab = Vocab.load(VOCAB["char"])
    out = Path(STAGE.at(params, model).outs.model)
    with training_slot(params), \
            tracking.training_run(params, model, _logged_params(params, model)) as run:
        lm = params.train_lm
        with progress_bar(model, lm.budget, lm.unit) as (bar, progress):
            def on_epoch(done: int, metrics: dict[str, float]) -> None:
                bar(done, metrics)
                run.log_epoch(done, metrics)
            result = trainer(params)(model, corpus, vocab, params,
                                     checkpoint_dir=CHECKPOINTS / model, on_epoch=on_epoch,
                                     on_progress=progress if lm.unit == "step" else None)
        from seqlm.train import model_of
        meta = write_model_dir(out, result, vocab, params)
        kept = model_of(result.config)
        kept.load_state_dict(result.best_state)
        samples = continuations(kept, vocab, params)
        _log_training(run, params, corpus, result, meta, samples, out)
        version = tracking.register_language_model(
            run, out, model, meta["best_val_perplexity"], meta["validation_digest"],
            rescorer(corpus, vocab, params), _version_description(meta, samples))
    # "champion": the registry's decision, announced by the flow for a training that ran
    return {"mlflow_run": run.run_id, "model_version": version, "tracked": run.error is None,
            "tracking_error": run.error, "champion": run.champion}


def trainer(params: Params) -> Callable[..., TrainResult]:
    """seqlm.train.train, or, for trainings side by side on the local runner, the same in a
    process of its own (seqlm.runtime.own_process); on Dask each runs in a worker process. A
    training alone on the local runner's CPU computes on every core."""
    local = params.execution.task_runner == "local"
    if local and side_by_side(params):
        # torch is imported by the training's process first: this one needs it only after
        from seqlm.runtime.own_process import train_in_own_process
        return train_in_own_process
    from seqlm.train import train
    if local and len(params.train_lm.models) == 1 and not cuda_in_use(params):
        return functools.partial(train, threads=cores)
    return train


def _logged_params(params: Params, model: str) -> dict:
    lm = params.train_lm
    return {"model": model, "seed": params.seed, "hidden_size": lm.hidden_size(model),
            **tracking.flatten(params.preprocess.model_dump(mode="json"), "preprocess."),
            **{k: v for k, v in lm.model_dump(mode="json").items()
               if k not in ("models", "hidden", "hidden_scratch")}}


def continuations(model: torch.nn.Module, vocab: Vocab, params: Params,
                  ) -> dict[str, dict[str, str]]:
    """Greedy and seeded sampled continuations of evaluate.prefixes by `model`."""
    from seqlm.generate import predict
    ev = params.evaluate
    clean = params.preprocess.clean
    return {prefix: {"greedy": predict(prefix, ev.num_chars, model, vocab, "cpu", clean=clean),
                     "sampled": predict(prefix, ev.num_chars, model, vocab, "cpu",
                                        temperature=ev.temperature, top_k=ev.top_k,
                                        seed=params.seed, clean=clean)}
            for prefix in ev.prefixes}


def rescorer(corpus: np.ndarray, vocab: Vocab, params: Params) -> tracking.Rescore:
    """A model's validation perplexity on this run's validation text, read through the model's
    own vocabulary (characters it does not know are <unk> to it): how a champion measured on
    other text is compared."""
    from seqlm import protocol
    from seqlm.train import perplexity, split_of
    split = split_of(corpus, params)
    chars = vocab.to_tokens(protocol.validation_text(corpus, split).tolist())

    def rescore(model: torch.nn.Module, model_vocab: Vocab) -> float:
        return perplexity(model, np.asarray(model_vocab[chars], dtype=np.int64),
                          split.val_start - split.context_start, "cpu")
    return rescore


def _log_training(run: tracking.Run, params: Params, corpus: np.ndarray, result: TrainResult,
                  meta: dict, samples: dict, out: Path) -> None:
    """What the training measured, in its MLflow run (the epochs went there as they ended)."""
    import pandas as pd

    from seqlm import protocol
    from seqlm.figures import png
    from seqlm.generate import HISTORY_FILE, META_FILE
    from seqlm.train import split_of
    # the names of reports/metrics and the summary (tasks/evaluate.py)
    metrics = {"best_epoch": meta["best_epoch"], **({"best_step": meta["best_step"]}
                                                     if "best_step" in meta else {}),
               "val_ppl_best": meta["best_val_perplexity"],
               "val_nats_best": math.log(meta["best_val_perplexity"]),
               "val_bits_best": math.log2(meta["best_val_perplexity"]),
               "train_ppl_best": meta["best_train_perplexity"],
               "val_ppl_last": meta["final_val_perplexity"],
               "train_ppl_last": meta["final_train_perplexity"]}
    timed = [row for row in result.history[result.resumed_from:] if "tokens_per_s" in row]
    if timed:
        metrics["mean_tokens_per_s"] = round(float(np.mean([r["tokens_per_s"] for r in timed])))
        metrics["train_wall_s"] = round(float(np.sum([r["seconds"] for r in timed])), 1)
    run.log_metrics(metrics)
    run.set_tags({"device": str(result.device), "stopped_early": str(result.stopped_early),
                  "resumed_from_epoch": str(result.resumed_from)})
    split = split_of(corpus, params)
    for context, part in zip(("training", "validation"), protocol.train_val(corpus, split)):
        run.log_dataset(f"{params.corpus_name}-chars-{context}", CORPUS["char"],
                        hashlib.sha256(np.ascontiguousarray(part).tobytes()).hexdigest(), context)
    run.log_dict(samples, "samples.json")
    run.log_artifacts([str(out / HISTORY_FILE), str(out / META_FILE)])
    history = pd.DataFrame(result.history)
    run.log_png(png(lambda: perplexity_figure(history, meta["model"], meta["unit"])),
                "perplexity.png")


@contextlib.contextmanager
def progress_bar(model: str, total: int, unit: str = "epoch",
                 ) -> Iterator[tuple[EpochCallback, ProgressCallback]]:
    """A live progress bar in the terminal (epoch or step, train/val perplexity, tokens/s, ETA);
    none when the output is not a terminal (logs, CI, a Prefect worker: the training logs a line
    at every checkpoint, and by steps at every evaluation, there). Yields the callback of a
    validated round and, by steps, that of the steps between two evaluations."""
    from tqdm import tqdm
    # miniters=1: tqdm would otherwise learn from an evaluation's jump (hundreds of steps) to
    # wait for as many before it redraws, and skip the progress reports between evaluations.
    bar = tqdm(total=total, desc=f"train_lm[{model}]", unit=unit, disable=None,
               dynamic_ncols=True, leave=True, miniters=1)
    first = True
    shown: dict[str, str] = {}

    def start(done: int) -> None:
        nonlocal first
        if first:
            # The pace counts from the first round reported, not from the bar's start: epochs
            # resumed from a checkpoint (hundreds at once) and the start-up of a training's
            # process gave a rate, and an ETA, wrong for as many epochs as tqdm smooths over
            # (minutes, when epochs are long). The elapsed time stays the whole stage's.
            first = False
            bar.initial = bar.n = bar.last_print_n = done
            bar.last_print_t = time.time()           # tqdm's clock

    def report(done: int, metrics: dict[str, float]) -> None:
        start(done)
        shown.update(train_ppl=f"{metrics['train_perplexity']:.3f}",
                     val_ppl=f"{metrics['val_perplexity']:.3f}",
                     tok_s=f"{metrics['tokens_per_s']:,.0f}")
        bar.set_postfix(shown, refresh=False)
        bar.update(done - bar.n)                 # redraws, with this round's numbers

    def progress(step: int, train_perplexity: float) -> None:
        start(step)
        # the last validation stays beside the training perplexity of the steps since it
        bar.set_postfix({**shown, "train_ppl": f"{train_perplexity:.3f}"}, refresh=False)
        bar.update(step - bar.n)
    try:
        yield report, progress
    finally:
        bar.close()


def write_model_dir(out: Path, result: TrainResult, vocab: Vocab, params: Params) -> dict:
    """models/<model>/: the best-validation epoch's weights, the vocabulary, the per-epoch
    history and meta.json, published together (a failed write leaves the previous folder).
    Only what the same params, code and machine reproduce byte for byte: timings and resume
    points go to MLflow and the logs. Returns meta.json's content."""
    import pandas as pd
    import torch

    from seqlm.generate import HISTORY_FILE, META_FILE, MODEL_FILE, VOCAB_FILE
    from seqlm.train import HISTORY_COLUMNS, STEP_HISTORY_COLUMNS
    config = result.config
    build = {k: config[k] for k in ("vocab_size", "hidden", "num_layers", "dropout")}
    build["name"] = config["model"]
    if config.get("embedding"):
        build["embedding"] = config["embedding"]
    last, best = result.history[-1], result.best
    by_steps = params.train_lm.unit == "step"
    # By steps an epoch is a fraction (passes over the training text); the step counts.
    epochs = (lambda row: row["epoch"]) if by_steps else (lambda row: int(row["epoch"]))
    # On the CPU, so that a GPU-trained model loads anywhere.
    state_dict = {k: v.detach().cpu() for k, v in result.best_state.items()}
    meta = {
        "model": config["model"],
        **{k: build[k] for k in ("vocab_size", "hidden", "num_layers")},
        "vocab_fingerprint": vocab.fingerprint(),
        "device": str(result.device), "torch": torch.__version__,
        "python": platform.python_version(),
        "unit": params.train_lm.unit,
        **({"steps": int(last["step"]), "best_step": int(best["step"])} if by_steps else {}),
        "epochs": epochs(last), "stopped_early": result.stopped_early,
        "final_train_perplexity": last["train_perplexity"],
        "final_val_perplexity": last["val_perplexity"],
        "best_epoch": epochs(best),
        "best_train_perplexity": best["train_perplexity"],
        "best_val_perplexity": best["val_perplexity"],
        "validation_digest": result.validation_digest,
        "params": {"seed": params.seed,
                   "preprocess": params.preprocess.model_dump(
                       mode="json", include={"clean", "train_tokens", "val_tokens",
                                             "test_tokens"}),
                   "train_lm": params.train_lm.model_dump(mode="json")},
        "run_config": config,
    }
    with publish() as outputs:
        folder = outputs.folder(out)
        save_torch(folder / MODEL_FILE, {"state_dict": state_dict, "config": build,
                                         "vocab_fingerprint": vocab.fingerprint()})
        vocab.save(folder / VOCAB_FILE)          # the folder is self-contained
        write_csv(folder / HISTORY_FILE, pd.DataFrame(
            result.history, columns=list(STEP_HISTORY_COLUMNS if by_steps else HISTORY_COLUMNS)))
        write_json(folder / META_FILE, meta)
    return meta


def _version_description(meta: dict, samples: dict[str, dict[str, str]]) -> str:
    where = (f"Best epoch {meta['best_epoch']} of {meta['epochs']}" if "steps" not in meta else
             f"Best at step {meta['best_step']} of {meta['steps']}")
    lines = [f"{where}: validation perplexity {meta['best_val_perplexity']:.3f}, "
             f"{math.log(meta['best_val_perplexity']):.4f} nats/char (final {meta['unit']}: "
             f"train {meta['final_train_perplexity']:.3f}, validation "
             f"{meta['final_val_perplexity']:.3f}).", "", "Continuations:"]
    for texts in samples.values():
        lines.append(f"- greedy: {markdown_code(texts['greedy'])}")
        lines.append(f"- sampled: {markdown_code(texts['sampled'])}")
    return "\n".join(lines)


def perplexity_figure(history: pd.DataFrame, title: str, unit: str = "epoch") -> Figure:
    """Training and validation perplexity per epoch, or step (d2l's animator plot, log scale)."""
    from matplotlib.figure import Figure
    figure = Figure(figsize=(6, 3))
    axes = figure.subplots()
    axes.plot(history[unit], history["train_perplexity"], label="train")
    axes.plot(history[unit], history["val_perplexity"], "--", label="validation")
    axes.set(xlabel=unit, ylabel="perplexity", yscale="log", title=title)
    axes.grid(True)
    axes.legend()
    figure.tight_layout()
    return figure
