"""What the pipeline logs to MLflow for each stage, read back from the files the stage wrote."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from seqlm import protocol
from seqlm import stages as S
from seqlm.io import file_digest
from seqlm.params import Params
from seqlm.tracking import Tracker, flatten
from seqlm.text import Vocab
from seqlm.train import perplexity, split_of


class StageLogger:
    def __init__(self, tracker: Tracker, params: Params) -> None:
        self.tracker = tracker
        self.params = params
        self.child_runs: dict[str, str | None] = {}
        self.open_runs: set[str] = set()
        # (tokens/s, seconds) per epoch of each training: run-specific, so MLflow's, not DVC's
        self.timings: dict[str, list[tuple[float, float]]] = {}

    def task_kwargs(self, stage: str, item: str | None) -> dict[str, Callable]:
        """Training stages get a per-epoch callback that logs into their own nested run."""
        if stage == "train_ar":
            section = {"seed": self.params.seed, **self.params.train_ar.model_dump(mode="json")}
            run_id = self._child("ar_mlp", section)
        elif stage == "train_lm":
            lm = self.params.train_lm
            section = {"model": item, "seed": self.params.seed,
                       "hidden_size": lm.hidden_size(item),
                       **flatten(self.params.preprocess.model_dump(mode="json"), "preprocess."),
                       **{k: v for k, v in lm.model_dump(mode="json").items()
                          if k not in ("models", "hidden", "hidden_scratch")}}
            run_id = self._child(item, section)
        else:
            return {}
        log_epoch = self.tracker.epoch_logger(run_id)
        timings = self.timings.setdefault(item or stage, [])

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            log_epoch(epoch, metrics)
            if "tokens_per_s" in metrics:
                timings.append((metrics["tokens_per_s"], metrics["seconds"]))
        return {"on_epoch": on_epoch}

    def _child(self, name: str, params: dict) -> str | None:
        self.child_runs[name] = self.tracker.child_run(name, params)
        self.open_runs.add(name)
        return self.child_runs[name]

    def _end_child(self, name: str, status: str = "FINISHED") -> None:
        self.tracker.end_child(self.child_runs.get(name), status)
        self.open_runs.discard(name)

    def end_runs(self, status: str) -> None:
        """Close the nested runs whose stage did not finish (the flow failed)."""
        for name in list(self.open_runs):
            self._end_child(name, status)

    def after(self, stage: str, item: str | None, paths: list[Path], cached: bool) -> None:
        getattr(self, f"_after_{stage}", lambda *_: None)(item, paths, cached)

    # ---- per stage ----------------------------------------------------------------------------
    def _after_preprocess(self, _item, _paths, _cached) -> None:
        lines = Path(S.LINES).read_text(encoding="utf-8").splitlines()
        raw = self.params.download.out
        sha256 = file_digest(raw)
        self.tracker.log_dataset(pd.DataFrame({"line": lines}), source=raw,
                                 name=self.params.corpus_name, context="corpus",
                                 digest=sha256[:16], tags={"sha256": sha256})
        self.tracker.log_artifacts([S.VOCAB["char"], S.VOCAB["word"]], "vocab")

    def _after_ngrams(self, _item, _paths, _cached) -> None:
        self.tracker.log_artifacts([S.NGRAMS], "ngrams")
        self.tracker.log_metrics_file(f"{S.REPORTS}/ngrams.json")

    def _after_sine(self, _item, _paths, _cached) -> None:
        self.tracker.log_dataset(pd.read_parquet(S.SINE), source=S.SINE, name="sine",
                                 context="training", run_id=self.child_runs.get("ar_mlp"))

    def _after_train_ar(self, _item, _paths, cached: bool) -> None:
        run_id = self.child_runs.get("ar_mlp")
        if cached:
            self._replay_history(run_id, Path(S.AR_DIR) / "history.csv")
        self.tracker.log_metrics_file(f"{S.REPORTS}/train_ar.json", run_id)
        self.tracker.log_artifacts([S.AR_DIR], "ar", run_id)
        self._end_child("ar_mlp")

    def _after_train_lm(self, item: str, _paths, cached: bool) -> None:
        run_id = self.child_runs.get(item)
        model_dir = Path(S.LM_DIR.replace("${item}", item))
        if cached:
            self._replay_history(run_id, model_dir / "history.csv")
        meta = json.loads((model_dir / "meta.json").read_text())
        metrics = {k: v for k, v in meta.items() if k.startswith(("final_", "best_"))}
        if self.timings.get(item):
            speeds, seconds = zip(*self.timings[item])
            metrics["mean_tokens_per_s"] = float(np.mean(speeds))
            metrics["train_wall_s"] = float(np.sum(seconds))
        self.tracker.log_metrics(run_id, metrics)
        self.tracker.set_tags(run_id, {"device": str(meta.get("device")), "cached": str(cached),
                                       "stopped_early": str(meta["stopped_early"])})
        ids = np.load(S.CORPUS["char"], mmap_mode="r")
        split = split_of(ids, self.params)
        for context, part in zip(("training", "validation"), protocol.train_val(ids, split)):
            self.tracker.log_dataset(pd.DataFrame({"char_id": np.asarray(part)}),
                                     source=S.CORPUS["char"],
                                     name=f"{self.params.corpus_name}-chars-{context}",
                                     context=context, run_id=run_id)
        self.tracker.log_artifacts([model_dir / "history.csv", model_dir / "meta.json"],
                                   run_id=run_id)
        self.tracker.log_figure(run_id, perplexity_figure(model_dir / "history.csv", item),
                                "perplexity.png")
        self.tracker.log_language_model(run_id, model_dir, item, meta["best_val_perplexity"],
                                        meta["validation_digest"], self._rescore)
        self._end_child(item)

    def _after_evaluate(self, _item, _paths, _cached) -> None:
        self.tracker.log_metrics_file(S.METRICS)
        self.tracker.log_artifacts([S.REPORTS], "reports")
        summary = Path(S.REPORTS) / "summary.md"
        print(summary.read_text(encoding="utf-8"))
        from prefect.artifacts import create_table_artifact
        table = pd.read_csv(Path(S.REPORTS) / "summary.csv")
        create_table_artifact(table=table.to_dict("records"), key="perplexity-summary",
                              description="Train/validation perplexity of each language model "
                                          "beside the character n-gram baseline")

    def _rescore(self, model: torch.nn.Module, vocab: Vocab) -> float:
        """`model`'s validation perplexity on this run's validation text, read through its own
        vocabulary (characters it does not know are <unk> to it)."""
        corpus = np.load(S.CORPUS["char"], mmap_mode="r")
        split = split_of(corpus, self.params)
        text = protocol.validation_text(corpus, split).tolist()
        chars = Vocab.load(S.VOCAB["char"]).to_tokens(text)
        return perplexity(model, np.asarray(vocab[chars], dtype=np.int64),
                          split.val_start - split.context_start, "cpu")

    def _replay_history(self, run_id: str | None, history: Path) -> None:
        """A cached stage did not train: log its per-epoch metrics from the history file."""
        for row in pd.read_csv(history).to_dict("records"):
            epoch = int(row.pop("epoch"))
            self.tracker.log_metrics(run_id, row, step=epoch)



def perplexity_figure(history: Path, title: str):
    """Training and validation perplexity per epoch (d2l's animator plot, log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    frame = pd.read_csv(history)
    figure, axes = plt.subplots(figsize=(6, 3))
    axes.plot(frame["epoch"], frame["train_perplexity"], label="train")
    axes.plot(frame["epoch"], frame["val_perplexity"], "--", label="validation")
    axes.set(xlabel="epoch", ylabel="perplexity", yscale="log", title=title)
    axes.grid(True)
    axes.legend()
    figure.tight_layout()
    plt.close(figure)
    return figure
