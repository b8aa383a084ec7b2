"""evaluate: every model side by side on the same held-out text, and what they generate."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from prefect import task

from seqlm import stages as S
from seqlm.generate import load_trained, predict
from seqlm.io import atomic_open, write_csv, write_json
from seqlm.ngram_lm import KneserNeyLM, unigram_perplexity
from seqlm.params import Params
from seqlm.text import Vocab
from seqlm.train import perplexity, split

CPU = torch.device("cpu")


@task(name="evaluate")
def evaluate(params: Params) -> list[Path]:
    lm, ev = params.train_lm, params.evaluate
    vocab = Vocab.load(S.VOCAB["char"])
    train_ids, val_ids = split(np.load(S.CORPUS["char"]), params)

    rows = []
    samples: dict[str, dict[str, dict[str, str]]] = {}
    curves: dict[str, pd.DataFrame] = {}
    for name in lm.models:
        model_dir = Path(S.LM_DIR.replace("${item}", name))
        # Scored on the CPU: evaluation is a few thousand tokens, and the numbers then do not
        # depend on which device trained the model.
        model, model_vocab, meta = load_trained(model_dir, device="cpu")
        if model_vocab.fingerprint() != vocab.fingerprint():
            raise ValueError(f"{model_dir}: trained on a different vocabulary than "
                             f"{S.VOCAB['char']}; re-run train_lm")
        val_ppl = perplexity(model, torch.as_tensor(val_ids, dtype=torch.long), CPU,
                             lm.batch_size, lm.num_steps)
        rows.append({"model": name, "train_perplexity": meta["final_train_perplexity"],
                     "val_perplexity": val_ppl, "tokens_per_s": meta.get("tokens_per_s"),
                     "device": meta.get("device")})
        samples[name] = {prefix: {
            "greedy": predict(prefix, ev.num_chars, model, vocab, CPU),
            "sampled": predict(prefix, ev.num_chars, model, vocab, CPU,
                               temperature=ev.temperature, top_k=ev.top_k, seed=params.seed),
        } for prefix in ev.prefixes}
        curves[name] = pd.read_csv(model_dir / "history.csv")

    kn = KneserNeyLM().fit(train_ids, len(vocab), ev.ngram_order)
    baselines = [
        {"model": f"kneser_ney_{ev.ngram_order}gram", "train_perplexity": kn.perplexity(train_ids),
         "val_perplexity": kn.perplexity(val_ids)},
        {"model": "unigram", "train_perplexity": unigram_perplexity(train_ids, train_ids, len(vocab)),
         "val_perplexity": unigram_perplexity(train_ids, val_ids, len(vocab))},
    ]
    table = pd.DataFrame(rows + baselines)
    ar = json.loads((Path(S.REPORTS) / "train_ar.json").read_text())
    kstep = pd.read_csv(Path(S.AR_DIR) / "kstep.csv")

    metrics = {
        "lm": {r["model"]: {"train_perplexity": r["train_perplexity"],
                            "val_perplexity": r["val_perplexity"]} for r in rows},
        "baseline": {b["model"]: {"val_perplexity": b["val_perplexity"]} for b in baselines},
        "ar": {f"kstep_mse_{int(k)}": float(m) for k, m in zip(kstep["k"], kstep["mse"])},
    }
    written = [write_json(S.METRICS, metrics)]
    for name, curve in curves.items():
        written.append(write_csv(f"{S.PLOTS}/perplexity/{name}.csv",
                                 curve[["epoch", "train_perplexity", "val_perplexity"]]))
    for stale in Path(S.PLOTS, "perplexity").glob("*.csv"):   # models no longer in the list
        if stale.stem not in curves:
            stale.unlink()
    written.append(write_csv(f"{S.PLOTS}/kstep.csv", kstep[["k", "mse"]]))
    written.append(write_csv(f"{S.REPORTS}/summary.csv", table))
    written.append(write_json(f"{S.REPORTS}/samples.json", samples))
    with atomic_open(f"{S.REPORTS}/summary.md", "w", encoding="utf-8") as handle:
        handle.write(_summary_markdown(table, kstep, ar, samples))
    written.append(Path(S.REPORTS) / "summary.md")
    return written


def _summary_markdown(table: pd.DataFrame, kstep: pd.DataFrame, ar: dict,
                      samples: dict[str, dict[str, dict[str, str]]]) -> str:
    lines = ["# Evaluation", "", "## Language models (character level, same validation text)", "",
             "| model | train perplexity | validation perplexity | tokens/s | device |",
             "|---|---:|---:|---:|---|"]
    for row in table.to_dict("records"):
        speed = row.get("tokens_per_s")
        lines.append(f"| {row['model']} | {row['train_perplexity']:.3f} | "
                     f"{row['val_perplexity']:.3f} | "
                     f"{'' if pd.isna(speed) or speed is None else f'{speed:,.0f}'} | "
                     f"{'' if pd.isna(row.get('device')) else row.get('device')} |")
    lines += ["", "## Sine autoregression (MLP, tau features)", "",
              f"Training loss after the last epoch: {ar['train_loss']:.6f}", "",
              "| k | k-step MSE (held-out) |", "|---:|---:|"]
    lines += [f"| {int(k)} | {m:.5f} |" for k, m in zip(kstep["k"], kstep["mse"])]
    lines += ["", "## Greedy continuations", ""]
    for name, by_prefix in samples.items():
        for prefix, texts in by_prefix.items():
            lines.append(f"- **{name}** `{prefix}` → `{texts['greedy']}`")
    return "\n".join(lines) + "\n"
