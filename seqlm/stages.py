"""The stage graph, declared once. dvc.yaml is generated from it (`seqlm dvc-yaml`), the Prefect
flow submits its nodes with their upstream futures, and tests/test_stages.py proves the two agree.

Every path a stage reads or writes has a name (`STAGE_BY_NAME["train_lm"].at(params, "rnn")
.outs.model`). Paths are relative to the repository root, the working directory of every stage
(as in DVC). `${item}` stands for one language model of `train_lm.models` (a DVC `foreach`
stage) and `${download.out}` for that param, the only path params.yaml sets; `Stage.at` is the
one place they are resolved.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import yaml

from seqlm.params import Params, TrainLmParams

RAW = "${download.out}"
RAW_SHA256 = "${download.out}.sha256"     # `sha256sum -c` format: what the download holds
PROCESSED = "data/processed"
LINES = f"{PROCESSED}/lines.txt"
VOCAB = {"char": f"{PROCESSED}/vocab_char.parquet", "word": f"{PROCESSED}/vocab_word.parquet"}
CORPUS = {"char": f"{PROCESSED}/corpus_char.npy", "word": f"{PROCESSED}/corpus_word.npy"}
NGRAMS = "data/ngrams"
SINE = "data/sine/series.parquet"
AR_DIR = "models/ar"
LM_DIR = "models/${item}"
MODELS = "models"
REPORTS = "reports"
METRICS = f"{REPORTS}/metrics"          # one JSON per model and baseline: `dvc metrics show`
PLOTS = f"{REPORTS}/plots"
# Every train_lm key but `models`: adding a model to the list must not retrain the others.
LM_TRAINING_KEYS = tuple(f"train_lm.{key}" for key in TrainLmParams.model_fields if key != "models")


class Paths(Mapping[str, str]):
    """Paths by name, read as attributes (`outs.model`) or items (`outs["model"]`)."""

    def __init__(self, paths: Mapping[str, str]) -> None:
        self._paths = dict(paths)

    def __getattr__(self, name: str) -> str:
        try:
            return self.__dict__["_paths"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name: str) -> str:
        return self._paths[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __repr__(self) -> str:
        return f"Paths({self._paths})"


class StagePaths(NamedTuple):
    """One stage's paths with params (and the item) filled in."""
    deps: Paths          # data read
    outs: Paths          # artifacts written (DVC-cached)
    metrics: Paths       # DVC metrics (JSON), written too, kept in git
    plots: Paths         # data of the top-level DVC plots, written too, kept in git
    reports: Paths       # other small results kept in git (uncached outs)
    code: tuple[str, ...]

    def written(self) -> list[str]:
        """Every path the stage writes."""
        return [*self.outs.values(), *self.metrics.values(), *self.plots.values(),
                *self.reports.values()]


@dataclass(frozen=True)
class Stage:
    name: str
    code: tuple[str, ...]                      # source files the stage runs (DVC deps too)
    params: tuple[str, ...]                    # params.yaml keys read
    outs: Mapping[str, str]
    deps: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, str] = field(default_factory=dict)
    plots: Mapping[str, str] = field(default_factory=dict)
    reports: Mapping[str, str] = field(default_factory=dict)
    foreach: str | None = None                 # params key listing the items (one task each)

    def at(self, params: Params, item: str | None = None) -> StagePaths:
        def resolve(paths: Mapping[str, str]) -> Paths:
            return Paths({name: _resolve(path, params, item) for name, path in paths.items()})
        return StagePaths(resolve(self.deps), resolve(self.outs), resolve(self.metrics),
                          resolve(self.plots), resolve(self.reports), self.code)

    def items(self, params: Params) -> list[str | None]:
        return list(params.section(self.foreach)) if self.foreach else [None]

    def label(self, item: str | None) -> str:
        """The task run's name: `train_lm[rnn]`."""
        return f"{self.name}[{item}]" if item else self.name

    def templates_written(self) -> list[str]:
        return [*self.outs.values(), *self.metrics.values(), *self.plots.values(),
                *self.reports.values()]


def _resolve(path: str, params: Params, item: str | None) -> str:
    path = path.replace("${download.out}", params.download.out)
    if "${item}" in path:
        if item is None:
            raise ValueError(f"{path}: the path of a foreach stage needs its item")
        path = path.replace("${item}", item)
    return path


STAGES: tuple[Stage, ...] = (
    # preprocess: a fetched corpus is checked as preprocess reads it, split included.
    Stage("download", code=("tasks/download.py", "seqlm/download.py", "seqlm/text.py",
                            "seqlm/protocol.py"), params=("download", "preprocess"),
          outs={"corpus": RAW, "sha256": RAW_SHA256}),
    Stage("preprocess", code=("tasks/preprocess.py", "seqlm/text.py", "seqlm/protocol.py"),
          params=("preprocess",), deps={"corpus": RAW}, outs={"processed": PROCESSED}),
    Stage("ngrams", code=("tasks/ngrams.py", "seqlm/ngrams.py", "seqlm/text.py",
                          "seqlm/threads.py", "seqlm/figures.py"),
          params=("ngrams",), deps={"processed": PROCESSED}, outs={"tables": NGRAMS},
          reports={"zipf": f"{REPORTS}/ngrams.json"}),
    Stage("sine", code=("tasks/sine.py", "seqlm/autoregress.py", "seqlm/threads.py"),
          params=("seed", "sine"),
          outs={"series": SINE}),
    Stage("train_ar", code=("tasks/train_ar.py", "seqlm/autoregress.py",
                            "seqlm/threads.py", "seqlm/figures.py"),
          params=("seed", "train_ar", "train_lm.cpu_threads"), deps={"series": SINE},
          outs={"model": AR_DIR}, metrics={"errors": f"{REPORTS}/train_ar.json"}),
    Stage("train_lm", code=("tasks/train_lm.py", "seqlm/models.py", "seqlm/train.py",
                            "seqlm/loaders.py", "seqlm/protocol.py", "seqlm/generate.py",
                            "seqlm/text.py", "seqlm/threads.py", "seqlm/figures.py"),
          params=("seed", "preprocess.clean", "preprocess.train_tokens",
                  "preprocess.val_tokens", "preprocess.test_tokens", *LM_TRAINING_KEYS),
          deps={"processed": PROCESSED}, outs={"model": LM_DIR}, foreach="train_lm.models"),
    Stage("evaluate", code=("tasks/evaluate.py", "seqlm/ngram_lm.py", "seqlm/ngrams.py",
                            "seqlm/generate.py", "seqlm/train.py", "seqlm/models.py",
                            "seqlm/loaders.py", "seqlm/protocol.py", "seqlm/text.py",
                            "seqlm/threads.py", "seqlm/figures.py"),
          params=("seed", "preprocess.clean", "preprocess.train_tokens",
                  "preprocess.val_tokens", "preprocess.test_tokens", "evaluate",
                  "train_lm.models", "train_lm.cpu_threads"),
          deps={"processed": PROCESSED, "models": MODELS, "ar_errors": f"{REPORTS}/train_ar.json"},
          outs={"summary": f"{REPORTS}/summary.md", "table": f"{REPORTS}/summary.csv",
                "samples": f"{REPORTS}/samples.json"},
          metrics={"metrics": METRICS}, plots={"plots": PLOTS}),
)
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


@functools.cache
def upstream(name: str) -> tuple[str, ...]:
    """The stages whose outputs stage `name` reads: the edges DVC derives from the same paths.
    `models/${item}` is inside `models`, so evaluate reads every train_lm item."""
    deps = STAGE_BY_NAME[name].deps.values()
    return tuple(other.name for other in STAGES if other.name != name and any(
        _overlaps(dep, out) for dep in deps for out in other.templates_written()))


class Node(NamedTuple):
    """One task of a pipeline run: a stage (and its item) with the labels of its upstream."""
    stage: Stage
    item: str | None
    label: str
    upstream: tuple[str, ...]


def nodes(params: Params) -> list[Node]:
    """Every task of a run in the stage graph's order (upstream first)."""
    labels = {stage.name: [stage.label(item) for item in stage.items(params)] for stage in STAGES}
    return [Node(stage, item, stage.label(item),
                 tuple(label for up in upstream(stage.name) for label in labels[up]))
            for stage in STAGES for item in stage.items(params)]


def to_dvc_yaml() -> dict:
    """The dvc.yaml mapping for STAGES; every stage runs `seqlm stage NAME [ITEM]`."""
    stages: dict[str, dict] = {}
    for stage in STAGES:
        body: dict = {"cmd": f"seqlm stage {stage.name}" + (" ${item}" if stage.foreach else "")}
        body["deps"] = [*stage.deps.values(), *stage.code]
        body["params"] = list(stage.params)
        body["outs"] = list(stage.outs.values())
        # Plot data and reports are uncached outs: committed to git, drawn only by the
        # top-level plots (a stage-level plot would also be drawn, against the row index).
        body["outs"] += [{path: {"cache": False}}
                         for path in (*stage.plots.values(), *stage.reports.values())]
        if stage.metrics:
            body["metrics"] = [{path: {"cache": False}} for path in stage.metrics.values()]
        stages[stage.name] = {"foreach": "${%s}" % stage.foreach, "do": body} if stage.foreach else body
    return {"stages": stages, "plots": _top_level_plots()}


CURVES_TEMPLATE = ".dvc/plots/curves.json"


def _top_level_plots() -> list[dict]:
    """One comparison per metric: every model the run trained on one chart (the CSVs are in
    long form: epoch, model, value; the `curves` template, CURVES_TEMPLATE, draws a line per
    model), the n-gram baselines, each named with its order, as flat lines."""
    return [
        {f"{PLOTS}/val_perplexity.csv": {
            "x": "epoch", "y": "val_perplexity", "template": "curves",
            "title": "Validation perplexity per epoch (lower is better; n-gram baselines flat)",
            "y_label": "validation perplexity"}},
        {f"{PLOTS}/train_perplexity.csv": {
            "x": "epoch", "y": "train_perplexity", "template": "curves",
            "title": "Training perplexity per epoch (the chapter's curves)",
            "y_label": "training perplexity"}},
        # `simple`: a line and its points, no smoothing slider (`linear` has one).
        {f"{PLOTS}/kstep.csv": {"x": "k", "y": "mse", "template": "simple",
                                "title": "Sine MLP: k-step prediction error (held-out MSE)",
                                "x_label": "k (steps ahead)", "y_label": "MSE"}},
        {f"{PLOTS}/comparison.png": {}},
    ]


def render_dvc_yaml() -> str:
    header = ("# Generated from seqlm/stages.py by `seqlm dvc-yaml`; do not edit by hand.\n"
              "# tests/test_stages.py fails when this file and the stage graph disagree.\n")
    return header + yaml.safe_dump(to_dvc_yaml(), sort_keys=False, width=100)
