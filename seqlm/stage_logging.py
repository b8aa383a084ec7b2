"""What the pipeline logs to MLflow for each stage, read back from the files the stage wrote."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from mlflow.utils.time import get_current_time_millis

from seqlm import protocol
from seqlm import stages as S
from seqlm.figures import png
from seqlm.io import file_digest
from seqlm.params import Params
from seqlm.tracking import Tracker, flatten
from seqlm.text import Vocab
from seqlm.train import perplexity, split_of

# Epoch metrics are sent to the store at most this often (and when the training ends): one
# transaction for a few epochs instead of one per epoch, which took ~7 ms of the training
# thread each on a local SQLite store.
EPOCHS_SENT_EVERY_S = 2.0


class StageLogger:
    """One MLflow child run per training that actually runs: opened when its first epoch is
    reported (so its start is the training's), ended as soon as its stage has been logged. A
    stage that was cached adds no run; the parent lists it and names the run that produced it."""

    def __init__(self, tracker: Tracker, params: Params) -> None:
        self.tracker = tracker
        self.params = params
        self.child_runs: dict[str, str | None] = {}
        self.monitors: dict[str, object] = {}
        self.cached: dict[str, str] = {}          # stage label -> the run that produced it
        # (tokens/s, seconds) per epoch of each training: run-specific, so MLflow's, not DVC's
        self.timings: dict[str, list[tuple[float, float]]] = {}
        self.sections: dict[str, dict] = {}       # the params each training's run logs
        self.worker = ""                          # where the stage being logged ran
        self.unlogged: dict[str, list[tuple[int, dict[str, float], int]]] = {}
        self.logged_at: dict[str, float] = {}     # when each run's epochs were last sent
        self._lock = threading.Lock()

    def task_kwargs(self, stage: str, item: str | None, live: bool = True,
                    ) -> dict[str, Callable]:
        """Training stages get a per-epoch callback that logs into their own nested run. Not
        `live` (the task runs in another process, on a Dask worker): no callback; the run is
        opened when the stage ends and its per-epoch history logged then."""
        if stage == "train_ar":
            name, section = "ar_mlp", {"seed": self.params.seed,
                                       **self.params.train_ar.model_dump(mode="json")}
        elif stage == "train_lm":
            lm = self.params.train_lm
            name, section = item, {
                "model": item, "seed": self.params.seed, "hidden_size": lm.hidden_size(item),
                **flatten(self.params.preprocess.model_dump(mode="json"), "preprocess."),
                **{k: v for k, v in lm.model_dump(mode="json").items()
                   if k not in ("models", "hidden", "hidden_scratch")}}
        else:
            return {}
        self.sections[name] = section
        if not live:
            return {}
        timings = self.timings.setdefault(name, [])

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            self._child(name, section)
            with self._lock:
                self.unlogged.setdefault(name, []).append(
                    (epoch, metrics, get_current_time_millis()))
                due = time.monotonic() - self.logged_at.get(name, 0.0) >= EPOCHS_SENT_EVERY_S
            if due:
                self._send_epochs(name)
            if "tokens_per_s" in metrics:
                timings.append((metrics["tokens_per_s"], metrics["seconds"]))
        return {"on_epoch": on_epoch}

    def _send_epochs(self, name: str) -> None:
        """Log the epochs reported since the last call, in one store transaction."""
        with self._lock:
            steps = self.unlogged.pop(name, [])
            self.logged_at[name] = time.monotonic()
        if steps:
            self.tracker.log_steps(self.child_runs.get(name), steps)

    def _child(self, name: str, params: dict) -> str | None:
        """The child run `name`, opened (with system metrics) on first use."""
        with self._lock:
            if name not in self.child_runs:
                run_id = self.tracker.child_run(name, params)
                self.child_runs[name] = run_id
                if run_id is not None:
                    self.monitors[name] = self.tracker.system_metrics(run_id)
            return self.child_runs[name]

    def _end_child(self, name: str, status: str = "FINISHED") -> None:
        self._send_epochs(name)
        monitor = self.monitors.pop(name, None)
        if monitor is not None:
            monitor.finish()
        self.tracker.end_child(self.child_runs.get(name), status)

    def end_runs(self, status: str) -> None:
        """Close the nested runs whose stage did not finish (the flow failed)."""
        for name in list(self.monitors):
            self._end_child(name, status)

    def after(self, stage: str, item: str | None, paths: list[Path], cached: bool,
              worker: str) -> None:
        """Log what stage (item) left behind; `worker` says where it ran."""
        label = f"{stage}[{item}]" if item else stage
        if cached:
            self.cached[label] = self._producer(stage, item) or ""
        self.worker = worker
        getattr(self, f"_after_{stage}", lambda *_: None)(item, paths, cached)

    def _trained(self, name: str, history: Path) -> str | None:
        """The child run of a training that ran; opened now, with its per-epoch history, when
        no callback reported the epochs live."""
        if name not in self.child_runs:
            run_id = self._child(name, self.sections.get(name, {}))
            now = get_current_time_millis()
            self.tracker.log_steps(run_id, [(int(row.pop("epoch")), row, now) for row
                                            in pd.read_csv(history).to_dict("records")])
        self._send_epochs(name)
        return self.child_runs[name]

    def finish(self) -> None:
        """Tell the parent run which stages were cached, and by which runs they were made."""
        if self.cached:
            # in the stage graph's order (dvc.yaml's), not the order they happened to finish in
            order = [f"{s.name}[{item}]" if item else s.name
                     for s in S.STAGES for item in s.items(self.params)]
            tags = {"cached_stages": ", ".join(sorted(self.cached, key=order.index))}
            # tag keys take no brackets: train_lm[rnn] -> cached_by.train_lm.rnn
            tags.update({f"cached_by.{label.replace('[', '.').rstrip(']')}": run
                         for label, run in self.cached.items() if run})
            self.tracker.set_tags(None, tags)

    def _producer(self, stage: str, item: str | None) -> str | None:
        if stage != "train_lm":
            return None
        weights = file_digest(Path(S.LM_DIR.replace("${item}", item)) / "model.pt")
        version = self.tracker.version_with_weights(self._registered(item), weights)
        return version.run_id if version is not None else None

    def _registered(self, model: str) -> str:
        return f"{self.params.corpus_name}-{model.replace('_', '-')}"

    # ---- per stage ----------------------------------------------------------------------------
    def _after_preprocess(self, _item, _paths, cached: bool) -> None:
        lines = Path(S.LINES).read_text(encoding="utf-8").splitlines()
        raw = self.params.download.out
        sha256 = file_digest(raw)
        self.tracker.log_dataset(pd.DataFrame({"line": lines}), source=raw,
                                 name=self.params.corpus_name, context="corpus",
                                 digest=sha256[:16], tags={"sha256": sha256})
        if not cached:
            self.tracker.log_artifacts([S.VOCAB["char"], S.VOCAB["word"]], "vocab")

    def _after_ngrams(self, _item, _paths, cached: bool) -> None:
        if not cached:
            self.tracker.log_artifacts([S.NGRAMS])          # under ngrams/
        self.tracker.log_metrics_file(f"{S.REPORTS}/ngrams.json")

    def _after_train_ar(self, _item, _paths, cached: bool) -> None:
        if cached:
            return
        run_id = self._trained("ar_mlp", Path(S.AR_DIR) / "history.csv")
        self.tracker.log_metrics_file(f"{S.REPORTS}/train_ar.json", run_id)
        self.tracker.log_dataset(pd.read_parquet(S.SINE), source=S.SINE, name="sine",
                                 context="training", run_id=run_id)
        self.tracker.log_artifacts([S.AR_DIR], run_id=run_id)   # under ar/
        self._end_child("ar_mlp")

    def _after_train_lm(self, item: str, _paths, cached: bool) -> None:
        model_dir = Path(S.LM_DIR.replace("${item}", item))
        meta = json.loads((model_dir / "meta.json").read_text())
        if cached:
            if self.cached.get(f"train_lm[{item}]"):
                return                      # trained and registered by an earlier run
            # never registered (the store was down when it trained): register it now
            run_id = self._child(item, {"model": item})
        else:
            run_id = self._trained(item, model_dir / "history.csv")
        metrics = {k: round(v, 4) for k, v in meta.items()
                   if k.startswith(("final_", "best_")) and k != "best_epoch"}
        metrics["best_epoch"] = meta["best_epoch"]
        if self.timings.get(item):
            speeds, seconds = zip(*self.timings[item])
            metrics["mean_tokens_per_s"] = round(float(np.mean(speeds)))
            metrics["train_wall_s"] = round(float(np.sum(seconds)), 1)
        self.tracker.log_metrics(run_id, metrics)
        self.tracker.set_tags(run_id, {"device": str(meta.get("device")),
                                       "stopped_early": str(meta["stopped_early"]),
                                       "worker": self.worker})
        ids = np.load(S.CORPUS["char"], mmap_mode="r")
        split = split_of(ids, self.params)
        for context, part in zip(("training", "validation"), protocol.train_val(ids, split)):
            self.tracker.log_dataset(pd.DataFrame({"char_id": np.asarray(part)}),
                                     source=S.CORPUS["char"],
                                     name=f"{self.params.corpus_name}-chars-{context}",
                                     context=context, run_id=run_id)
        samples = self._continuations(model_dir)
        self.tracker.log_dict(run_id, samples, "samples.json")
        self.tracker.log_artifacts([model_dir / "history.csv", model_dir / "meta.json"],
                                   run_id=run_id)
        self.tracker.log_png(run_id, png(lambda: perplexity_figure(model_dir / "history.csv",
                                                                   item)), "perplexity.png")
        self.tracker.log_language_model(
            run_id, model_dir, item, meta["best_val_perplexity"], meta["validation_digest"],
            self._rescore, description=_version_description(meta, samples))
        self._end_child(item)

    def _continuations(self, model_dir: Path) -> dict[str, dict[str, str]]:
        """Greedy and seeded sampled continuations of evaluate.prefixes by the kept model."""
        from seqlm.generate import load_trained, predict
        ev = self.params.evaluate
        model, vocab, _ = load_trained(model_dir, device="cpu")
        return {prefix: {"greedy": predict(prefix, ev.num_chars, model, vocab, "cpu"),
                         "sampled": predict(prefix, ev.num_chars, model, vocab, "cpu",
                                            temperature=ev.temperature, top_k=ev.top_k,
                                            seed=self.params.seed)}
                for prefix in ev.prefixes}

    def _after_evaluate(self, _item, _paths, _cached) -> None:
        for path in sorted(Path(S.METRICS).glob("*.json")):   # e.g. rnn.val_ppl
            self.tracker.log_metrics(None, flatten(json.loads(path.read_text()), f"{path.stem}."))
        self.tracker.log_artifacts([S.REPORTS])         # under reports/
        summary = Path(S.REPORTS) / "summary.md"
        print(summary.read_text(encoding="utf-8"))
        from prefect.artifacts import create_table_artifact
        table = pd.read_csv(Path(S.REPORTS) / "summary.csv")
        create_table_artifact(table=table.to_dict("records"), key="perplexity-summary",
                              description="Train/validation perplexity of each language model "
                                          "beside the character n-gram baselines")

    def _rescore(self, model: torch.nn.Module, vocab: Vocab) -> float:
        """`model`'s validation perplexity on this run's validation text, read through its own
        vocabulary (characters it does not know are <unk> to it)."""
        corpus = np.load(S.CORPUS["char"], mmap_mode="r")
        split = split_of(corpus, self.params)
        text = protocol.validation_text(corpus, split).tolist()
        chars = Vocab.load(S.VOCAB["char"]).to_tokens(text)
        return perplexity(model, np.asarray(vocab[chars], dtype=np.int64),
                          split.val_start - split.context_start, "cpu")



def _version_description(meta: dict, samples: dict[str, dict[str, str]]) -> str:
    lines = [f"Best epoch {meta['best_epoch']} of {meta['epochs']}: validation perplexity "
             f"{meta['best_val_perplexity']:.3f} (final epoch: train {meta['final_train_perplexity']:.3f}, "
             f"validation {meta['final_val_perplexity']:.3f}).", "", "Continuations:"]
    for prefix, texts in samples.items():
        lines.append(f"- greedy: `{texts['greedy']}`")
        lines.append(f"- sampled: `{texts['sampled']}`")
    return "\n".join(lines)


def perplexity_figure(history: Path, title: str) -> Figure:
    """Training and validation perplexity per epoch (d2l's animator plot, log scale)."""
    frame = pd.read_csv(history)
    figure = Figure(figsize=(6, 3))
    axes = figure.subplots()
    axes.plot(frame["epoch"], frame["train_perplexity"], label="train")
    axes.plot(frame["epoch"], frame["val_perplexity"], "--", label="validation")
    axes.set(xlabel="epoch", ylabel="perplexity", yscale="log", title=title)
    axes.grid(True)
    axes.legend()
    figure.tight_layout()
    return figure
