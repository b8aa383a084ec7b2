"""The stage graph, declared once. dvc.yaml is generated from it (`seqlm dvc-yaml`) and the
Prefect flow walks it; tests/test_stages.py proves the committed dvc.yaml and the flow agree.

Paths are relative to the repository root, the working directory of every stage (as in DVC).
`${item}` stands for one language model of `train_lm.models` (a DVC `foreach` stage) and
`${download.out}` for that param, the only path that params.yaml sets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import yaml

from seqlm.params import ModelName, Params, TrainLmParams

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


@dataclass(frozen=True)
class Stage:
    name: str
    deps: tuple[str, ...]            # files and folders read (code included)
    params: tuple[str, ...]          # params.yaml keys read
    outs: tuple[str, ...]            # files and folders written
    metrics: tuple[str, ...] = ()    # DVC metrics (JSON), written too, kept in git
    plots: tuple[str, ...] = ()      # data of the top-level DVC plots, written too, kept in git
    reports: tuple[str, ...] = ()    # other small results kept in git (uncached outs)
    foreach: str | None = None       # params key listing the items (one task per item)

    def paths(self, params: Params, item: str | None = None) -> dict[str, list[str]]:
        """deps/outs with ${...} resolved from params (and the item, for foreach stages)."""
        def resolve(path: str) -> str:
            path = path.replace("${download.out}", params.download.out)
            return path.replace("${item}", item) if item is not None else path
        return {kind: [resolve(p) for p in getattr(self, kind)]
                for kind in ("deps", "outs", "metrics", "plots", "reports")}

    def written(self, params: Params, item: str | None = None) -> list[str]:
        """Every path the stage writes."""
        paths = self.paths(params, item)
        return paths["outs"] + paths["metrics"] + paths["plots"] + paths["reports"]

    def items(self, params: Params) -> list[str | None]:
        return list(params.section(self.foreach)) if self.foreach else [None]


STAGES: tuple[Stage, ...] = (
    Stage("download", deps=("tasks/download.py", "seqlm/download.py"), params=("download",),
          outs=(RAW, RAW_SHA256)),
    Stage("preprocess", deps=(RAW, "tasks/preprocess.py", "seqlm/text.py", "seqlm/protocol.py"),
          params=("preprocess",), outs=(PROCESSED,)),
    Stage("ngrams", deps=(PROCESSED, "tasks/ngrams.py", "seqlm/ngrams.py", "seqlm/text.py",
                          "seqlm/figures.py"),
          params=("ngrams",), outs=(NGRAMS,), reports=(f"{REPORTS}/ngrams.json",)),
    Stage("sine", deps=("tasks/sine.py", "seqlm/autoregress.py"), params=("seed", "sine"),
          outs=(SINE,)),
    Stage("train_ar", deps=(SINE, "tasks/train_ar.py", "seqlm/autoregress.py", "seqlm/threads.py",
                            "seqlm/figures.py"),
          params=("seed", "train_ar", "train_lm.cpu_threads"),
          outs=(AR_DIR,), reports=(f"{REPORTS}/train_ar.json",)),
    Stage("train_lm", deps=(PROCESSED, "tasks/train_lm.py", "seqlm/models.py",
                            "seqlm/train.py", "seqlm/loaders.py", "seqlm/protocol.py",
                            "seqlm/generate.py", "seqlm/text.py", "seqlm/threads.py"),
          params=("seed", "preprocess.train_tokens", "preprocess.val_tokens", *LM_TRAINING_KEYS),
          outs=(LM_DIR,), foreach="train_lm.models"),
    Stage("evaluate", deps=(PROCESSED, MODELS, f"{REPORTS}/train_ar.json", "tasks/evaluate.py",
                            "seqlm/ngram_lm.py", "seqlm/ngrams.py", "seqlm/generate.py",
                            "seqlm/train.py", "seqlm/models.py", "seqlm/loaders.py",
                            "seqlm/protocol.py", "seqlm/text.py", "seqlm/threads.py",
                            "seqlm/figures.py"),
          params=("seed", "preprocess.train_tokens", "preprocess.val_tokens", "evaluate",
                  "train_lm.models", "train_lm.cpu_threads"),
          outs=(f"{REPORTS}/summary.md", f"{REPORTS}/summary.csv", f"{REPORTS}/samples.json"),
          metrics=(METRICS,), plots=(PLOTS,)),
)
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}


def to_dvc_yaml() -> dict:
    """The dvc.yaml mapping for STAGES; every stage runs `seqlm stage NAME [ITEM]`."""
    stages: dict[str, dict] = {}
    for stage in STAGES:
        body: dict = {"cmd": f"seqlm stage {stage.name}" + (" ${item}" if stage.foreach else "")}
        body["deps"] = list(stage.deps)
        body["params"] = list(stage.params)
        body["outs"] = list(stage.outs)
        # Plot data and reports are uncached outs: committed to git, drawn only by the
        # top-level plots (a stage-level plot would also be drawn, against the row index).
        body["outs"] += [{path: {"cache": False}} for path in stage.plots + stage.reports]
        if stage.metrics:
            body["metrics"] = [{path: {"cache": False}} for path in stage.metrics]
        stages[stage.name] = {"foreach": "${%s}" % stage.foreach, "do": body} if stage.foreach else body
    return {"stages": stages, "plots": _top_level_plots()}


BASELINE_CURVES = ("kneser_ney", "unigram")
CURVES_TEMPLATE = ".dvc/plots/curves.json"


def _top_level_plots() -> list[dict]:
    """One comparison per metric: every model on one chart (a column per model; the columns of
    models not trained stay empty, and the `curves` template, CURVES_TEMPLATE, leaves them
    out), the n-gram baselines as flat lines."""
    models = list(get_args(ModelName))
    return [
        {f"{PLOTS}/val_perplexity.csv": {
            "x": "epoch", "y": [*models, *BASELINE_CURVES], "template": "curves",
            "title": "Validation perplexity per epoch (lower is better; n-gram baselines flat)",
            "y_label": "validation perplexity"}},
        {f"{PLOTS}/train_perplexity.csv": {
            "x": "epoch", "y": models, "template": "curves",
            "title": "Training perplexity per epoch (the chapter's curves)",
            "y_label": "training perplexity"}},
        {f"{PLOTS}/kstep.csv": {"x": "k", "y": "mse", "template": "linear",
                                "title": "Sine MLP: k-step prediction error (held-out MSE)",
                                "x_label": "k (steps ahead)", "y_label": "MSE"}},
        {f"{PLOTS}/comparison.png": {}},
    ]


def render_dvc_yaml() -> str:
    header = ("# Generated from seqlm/stages.py by `seqlm dvc-yaml`; do not edit by hand.\n"
              "# tests/test_stages.py fails when this file and the stage graph disagree.\n")
    return header + yaml.safe_dump(to_dvc_yaml(), sort_keys=False, width=100)
