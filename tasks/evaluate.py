"""evaluate: every model side by side on the same held-out text, and what they generate.

torch, pandas and matplotlib are imported in the functions that use them: a run that finds
the stage cached never loads them (bench/main_job.py, the re-run with nothing changed)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, get_args

import numpy as np

from seqlm import stages as S
from seqlm.io import publish, write_csv, write_json
from seqlm.params import ModelName, Params
from seqlm.runtime.records import Record, stage_task
from seqlm.text import markdown_code
from seqlm.tracking import flatten

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from seqlm import protocol

STAGE = S.STAGE_BY_NAME["evaluate"]


@stage_task("evaluate")
def evaluate(params: Params) -> Record:
    """Every language model and baseline scored by the same protocol (seqlm.protocol) on the same
    validation tokens, the AR model's k-step errors, and what the models generate. Returns the
    metrics, the summary (markdown and rows) and the reports for the pipeline's MLflow run."""
    import pandas as pd

    from seqlm import protocol
    from seqlm.figures import save_png
    from seqlm.generate import load_trained, predict
    from seqlm.ngram_lm import KneserNeyLM, unigram_log_probs, unigram_perplexity
    from seqlm.text import Vocab
    from seqlm.threads import use_cpu_threads
    from seqlm.train import split_of, token_nll
    lm, ev, clean = params.train_lm, params.evaluate, params.preprocess.clean
    use_cpu_threads(params)
    paths = STAGE.at(params)
    vocab = Vocab.load(S.VOCAB["char"])
    corpus = np.load(S.CORPUS["char"])
    split = split_of(corpus, params)
    train_ids = corpus[:split.train_end]
    text = protocol.validation_text(corpus, split)
    first = split.val_start - split.context_start
    test = protocol.heldout_text(corpus, split)      # (text, first), or None: no test split

    rows = []
    samples: dict[str, dict[str, dict[str, str]]] = {}
    curves: dict[str, pd.DataFrame] = {}
    for name in lm.models:
        model_dir = Path(S.STAGE_BY_NAME["train_lm"].at(params, name).outs.model)
        # Scored on the CPU: evaluation is a few thousand tokens, and the numbers then do not
        # depend on which device trained the model.
        model, model_vocab, meta = load_trained(model_dir, device="cpu")
        if model_vocab.fingerprint() != vocab.fingerprint():
            raise ValueError(f"{model_dir}: trained on a different vocabulary than "
                             f"{S.VOCAB['char']}; re-run train_lm")
        nll = token_nll(model, text, first, "cpu")
        by_steps = "steps" in meta         # its epochs are fractions: the steps count
        rows.append({"model": name, **({"steps": meta["steps"], "best_step": meta["best_step"]}
                                       if by_steps else
                                       {"epochs": meta["epochs"], "best_epoch": meta["best_epoch"]}),
                     "train_ppl_last": meta["final_train_perplexity"],
                     "val_ppl_last": meta["final_val_perplexity"],
                     **_scores("val", nll), "scored_tokens": len(nll),
                     **(_scores("test", token_nll(model, *test, "cpu")) if test else {})})
        samples[name] = {prefix: {
            "greedy": predict(prefix, ev.num_chars, model, vocab, "cpu", clean=clean),
            "sampled": predict(prefix, ev.num_chars, model, vocab, "cpu",
                               temperature=ev.temperature, top_k=ev.top_k, seed=params.seed,
                               clean=clean),
        } for prefix in ev.prefixes}
        curves[name] = pd.read_csv(model_dir / "history.csv")

    for order in ev.ngram_orders:
        kn = KneserNeyLM().fit(train_ids, len(vocab), order)
        rows.append(_baseline(f"kneser_ney_{order}gram", kn.perplexity(train_ids),
                              kn.token_log_probs(text, first),
                              kn.token_log_probs(*test) if test else None))
    rows.append(_baseline("unigram", unigram_perplexity(train_ids, train_ids, len(vocab)),
                          unigram_log_probs(train_ids, text, len(vocab), first),
                          unigram_log_probs(train_ids, test[0], len(vocab), test[1]) if test else None))
    columns = summary_columns(lm.unit, test is not None)
    table = pd.DataFrame(rows, columns=columns).astype(
        {column: "Int64" for column in INTEGER_COLUMNS if column in columns})
    baselines = ~table["model"].isin(lm.models)
    ar = json.loads(Path(paths.deps.ar_errors).read_text())
    kstep = pd.read_csv(Path(S.AR_DIR) / "kstep.csv")

    metrics = _metrics(table)
    summary = _summary_markdown(table, split, kstep, ar, samples, lm.unit)
    with publish() as outputs:                  # every report or none
        folder = outputs.folder(paths.metrics.metrics)   # models no longer listed leave with it
        for name, values in metrics.items():
            write_json(folder / f"{name}.json", values)
        plots = outputs.folder(paths.plots.plots)
        for metric in ("val_perplexity", "train_perplexity"):
            write_csv(plots / f"{metric}.csv", _per_epoch(curves, metric, table[baselines]))
        write_csv(plots / "kstep.csv", kstep[["k", "mse"]])
        save_png(plots / "comparison.png",
                 lambda: comparison_figure(curves, table, lm.unit))
        write_csv(outputs.file(paths.outs.table), table)
        write_json(outputs.file(paths.outs.samples), samples)
        with open(outputs.file(paths.outs.summary), "w", encoding="utf-8") as handle:
            handle.write(summary)
    rows = [{k: _significant(k, v) for k, v in row.items() if not _missing(v)}
            for row in table.to_dict("records")]
    return {"metrics": flatten(metrics), "summary": summary, "table": rows,
            "artifacts": {"": [S.REPORTS]}}


# The metrics' names, the same in reports/metrics (DVC), the MLflow runs and the summary:
# `_best` is the kept model's (its best-validation epoch, or step), `_last` the final epoch's
# (the chapter's numbers); a baseline's `train_ppl` is its perplexity on the training text.
# Beside each perplexity of the held-out texts, its cross-entropy in nats and in bits per
# character (log and log2 of it): the units published results on a corpus use.
SIGNIFICANT = 4          # digits of the numbers in tables and metrics files
INTEGER_COLUMNS = ("epochs", "best_epoch", "steps", "best_step", "scored_tokens")


def summary_columns(unit: str, test: bool) -> list[str]:
    """The columns of reports/summary.csv: by epochs or by steps, with a test split or not."""
    rounds = ["epochs", "best_epoch"] if unit == "epoch" else ["steps", "best_step"]
    return ["model", *rounds, "train_ppl_last", "val_ppl_last", "train_ppl", "val_ppl_best",
            "val_nats_best", "val_bits_best", "scored_tokens",
            *(["test_ppl", "test_nats", "test_bits"] if test else [])]


def _scores(text: str, nll: np.ndarray) -> dict[str, float]:
    """A held-out text's perplexity and cross-entropy (nats, bits per token) from the
    negative log-likelihood of each token; `val` is the kept model's (`_best`)."""
    suffix = "_best" if text == "val" else ""
    nats = float(nll.mean())
    return {f"{text}_ppl{suffix}": math.exp(nats), f"{text}_nats{suffix}": nats,
            f"{text}_bits{suffix}": nats / math.log(2)}


def _missing(value: object) -> bool:
    """A table's empty cell (NaN, None, or pandas' NA in an integer column)."""
    import pandas as pd
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _significant(column: str, value: object) -> object:
    """A table's value as it is written: counts as integers, perplexities to SIGNIFICANT
    significant digits, names as they are."""
    if column in INTEGER_COLUMNS:
        return int(value)
    return float(f"{value:.{SIGNIFICANT}g}") if isinstance(value, float) else value


def _baseline(name: str, train_perplexity: float, log_probs: np.ndarray,
              test_log_probs: np.ndarray | None) -> dict:
    return {"model": name, "train_ppl": train_perplexity, **_scores("val", -log_probs),
            "scored_tokens": len(log_probs),
            **(_scores("test", -test_log_probs) if test_log_probs is not None else {})}


def _metrics(table: pd.DataFrame) -> dict[str, dict]:
    """reports/metrics/<model>.json, one row each in `dvc metrics show`: the kept model's
    validation perplexity, its epoch and the final epoch's perplexities; for a baseline its
    validation and training-text perplexity."""
    keys = ("best_epoch", "best_step", "val_ppl_best", "val_nats_best", "val_bits_best",
            "val_ppl_last", "train_ppl_last", "train_ppl", "test_ppl", "test_nats", "test_bits")
    return {row["model"]: {k: _significant(k, row[k]) for k in keys
                           if k in row and not _missing(row[k])}
            for row in table.to_dict("records")}


def _per_epoch(curves: dict[str, pd.DataFrame], metric: str, baselines: pd.DataFrame,
               ) -> pd.DataFrame:
    """`metric` per epoch in long form (epoch, model, value), the models this run trained in
    the order of MODEL_NAMES (by steps, an epoch is a fraction: the passes over the training
    text at each evaluation); for validation perplexity each n-gram baseline too, under its
    own name (`kneser_ney_3gram`), as a constant over the epochs of the models."""
    import pandas as pd
    rows = [frame.assign(model=name)[["epoch", "model", metric]]
            for name in get_args(ModelName) if name in curves
            for frame in [curves[name]]]
    if metric == "val_perplexity":
        epochs = sorted(set().union(*(curve["epoch"].tolist() for curve in curves.values())))
        rows += [pd.DataFrame({"epoch": epochs, "model": row["model"],
                               metric: row["val_ppl_best"]})
                 for row in baselines.to_dict("records")]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["epoch", "model", metric])


# A dash per baseline (the full-corpus and raw-text experiments have five: orders 3-6, unigram).
BASELINE_DASHES = ["--", ":", "-.", (0, (1, 4)), (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)),
                   (0, (8, 3)), (0, (1, 1))]


def comparison_figure(curves: dict[str, pd.DataFrame], table: pd.DataFrame,
                      unit: str = "epoch") -> Figure:
    """Validation perplexity per epoch (or step) of every model, a dot on the one it keeps;
    the n-gram baselines as flat grey lines (each its own dash: axhline does not take the next
    colour, so they came out in the first model's)."""
    from matplotlib.figure import Figure
    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.subplots()
    kept = table.set_index("model")
    for name, curve in curves.items():
        at, ppl = kept.loc[name, f"best_{unit}"], kept.loc[name, "val_ppl_best"]
        axes.plot(curve[unit], curve["val_perplexity"], marker="o",
                  markevery=np.flatnonzero(curve[unit].to_numpy() == at).tolist(),
                  label=f"{name} (kept: {unit} {at:.0f}, {ppl:.2f})")
    baselines = table[~table["model"].isin(curves)].to_dict("records")
    for row, style in zip(baselines, BASELINE_DASHES):
        axes.axhline(row["val_ppl_best"], linestyle=style, linewidth=1.2, color="0.35",
                     label=f"{row['model']} ({row['val_ppl_best']:.2f})")
    axes.set(xlabel=unit, ylabel="validation perplexity", yscale="log",
             title="Every model on the same validation text")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def _summary_markdown(table: pd.DataFrame, split: protocol.Split, kstep: pd.DataFrame, ar: dict,
                      samples: dict[str, dict[str, dict[str, str]]], unit: str = "epoch") -> str:
    def num(value: object, spec: str = f".{SIGNIFICANT}g") -> str:
        return "" if _missing(value) else format(value, spec)

    rounds = "epochs" if unit == "epoch" else "steps"
    test = "test_ppl" in table.columns
    lines = ["# Evaluation", "",
             f"## Language models (character level, the same {split.scored:,} validation "
             "characters)", "",
             ("The kept model of each RNN is its best-validation epoch; the final epoch's "
              "perplexities are the chapter's numbers." if unit == "epoch" else
              "The kept model of each RNN is the weights of its best evaluation; the last "
              "evaluation's perplexities beside them.") +
             " Cross-entropy of the kept model in nats and bits per character (the units "
             "published results use).", "",
             f"| model | {rounds} | best {unit} | val_ppl_best (kept model) | val nats/char | "
             "val bits/char | val_ppl_last | train_ppl_last | train_ppl (baseline) |" +
             (" test_ppl | test nats/char | test bits/char |" if test else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if test else "")]
    for row in table.to_dict("records"):
        lines.append(f"| {row['model']} | {num(row[rounds], '.0f')} | "
                     f"{num(row[f'best_{unit}'], '.0f')} | {num(row['val_ppl_best'])} | "
                     f"{num(row['val_nats_best'])} | {num(row['val_bits_best'])} | "
                     f"{num(row['val_ppl_last'])} | {num(row['train_ppl_last'])} | "
                     f"{num(row['train_ppl'])} |" +
                     (f" {num(row['test_ppl'])} | {num(row['test_nats'])} | "
                      f"{num(row['test_bits'])} |" if test else ""))
    if test:
        lines += ["", f"The test text ({split.test_end - split.test_start:,} characters, the "
                  "corpus's last) is held out: no model was trained or chosen on it."]
    lines += ["", "## Sine autoregression (MLP, tau features)", "",
              f"Training loss after the last epoch: {num(ar['train_loss'])}", "",
              "| k | k-step MSE (held-out) |", "|---:|---:|"]
    lines += [f"| {int(k)} | {num(m)} |" for k, m in zip(kstep["k"], kstep["mse"])]
    lines += ["", "## Greedy continuations", ""]
    for name, by_prefix in samples.items():
        for prefix, texts in by_prefix.items():
            if "\n" in texts["greedy"] or "`" in texts["greedy"]:   # a raw text: one block
                lines.append(f"- **{name}** from {prefix!r}:{markdown_code(texts['greedy'])}")
            else:
                lines.append(f"- **{name}** `{prefix}` → `{texts['greedy']}`")
    return "\n".join(lines) + "\n"
