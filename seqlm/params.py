"""The schema of params.yaml. Every stage reads its section from here, never from raw YAML."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Literal, get_args
from urllib.parse import unquote, urlparse

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

PARAMS_FILE = Path("params.yaml")
ModelName = Literal["rnn_scratch", "rnn", "gru", "lstm"]
MODEL_NAMES: tuple[str, ...] = get_args(ModelName)
# Weight matrices per layer of each model, relative to a tanh RNN's: its size and its work per
# time step (a GRU has 3 gates, an LSTM 4).
GATES: dict[str, int] = {"rnn_scratch": 1, "rnn": 1, "gru": 3, "lstm": 4}
PositiveInt = Annotated[int, Field(gt=0)]


def check_model_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODEL_NAMES)}")


PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names file, key and value."""


class Section(BaseModel):
    # strict: "5" is not an int; forbid: a typo in a key is an error, not a silent default.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DownloadParams(Section):
    """Where the corpus comes from and how it is checked."""
    sources: list[str] = Field(min_length=1, description="Tried in order: `https://`, `http://`, `file://` or a path relative to the repository root.")
    checksum: str | None = Field(None, description="sha1 (40 hex digits) or sha256 (64) of the corpus; a cached file that matches is not fetched again. `null`: the source's content may change; every run fetches it and records its sha256.")
    out: str = Field(description="Where the corpus is stored: a relative path inside the repository (DVC tracks only what lies there).")
    connect_timeout_s: PositiveFloat = Field(5.0, description="Seconds to wait for a connection.")
    read_timeout_s: PositiveFloat = Field(30.0, description="Seconds to wait for the next bytes.")
    retries: Annotated[int, Field(ge=0, le=10)] = Field(2, description="Prefect retries on network errors, with exponential backoff.")

    @field_validator("checksum")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.lower()
        if len(value) not in (40, 64) or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("must be a sha1 (40 hex digits) or sha256 (64 hex digits)")
        return value

    @field_validator("out")
    @classmethod
    def _inside_the_repository(cls, value: str) -> str:
        # DVC tracks only what lies in the repository, and a run must not write elsewhere.
        path = Path(value)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise ValueError(f"{value!r} must be a relative path inside the repository, "
                             "e.g. data/raw/timemachine.txt")
        return value

    @property
    def algorithm(self) -> str:
        return "sha1" if self.checksum is not None and len(self.checksum) == 40 else "sha256"


# A validation text shorter than this scores nothing that a person could compare: its
# perplexity is the exponential of a mean over so few tokens that its noise outweighs the gap
# between two models (on one character, a 2-epoch model beat a 500-epoch one). Below it a run
# still trains and registers, but never moves the champion alias (seqlm/tracking.py).
CHAMPION_MIN_VAL_TOKENS = 1_000


class PreprocessParams(Section):
    """Vocabularies and the split of the character corpus."""
    clean: Literal["letters", "none"] = Field("letters", description="`letters`: the chapter's rule (every run of characters outside A-Z/a-z becomes one space, then lower case; lines joined with no separator). `none`: the text as it is: every character UTF-8 decodes, newlines included, a byte-order mark dropped, CRLF read as LF.")
    min_freq: Annotated[int, Field(ge=0)] = Field(0, description="Tokens rarer than this map to `<unk>`.")
    reserved_tokens: list[Annotated[str, Field(min_length=1)]] = Field([], description="Placed after `<unk>` (always index 0) in the vocabularies; none twice.")
    # A perplexity needs at least one token scored after one of context: val_tokens 2 at least.
    train_tokens: PositiveInt | None = Field(10_000, description="The first N character ids train the language models. `null`: everything before the last `val_tokens` (and `test_tokens`): a split of the whole corpus.")
    val_tokens: Annotated[int, Field(ge=2)] = Field(5_000, description="The next N character ids validate them: they choose the kept model and the champion.")
    test_tokens: Annotated[int, Field(ge=2)] | None = Field(None, description="The last N character ids of the corpus, held out: never trained on nor used to choose a model; every model and baseline is scored on them and reported. `null`: no test split.")

    @field_validator("reserved_tokens")
    @classmethod
    def _distinct_reserved(cls, value: list[str]) -> list[str]:
        if "<unk>" in value:
            raise ValueError("'<unk>' is always index 0; do not reserve it again")
        twice = sorted({t for t in value if value.count(t) > 1})
        if twice:
            raise ValueError(f"lists {', '.join(map(repr, twice))} twice")
        return value


class NgramParams(Section):
    """Word and character n-gram counts of the whole corpus."""
    max_n: Annotated[int, Field(ge=1, le=10)] = Field(3, description="n-grams for n = 1..max_n, word and character level.")
    chunk_tokens: Annotated[int, Field(ge=1_000)] = Field(16_000_000, description="Tokens counted at a time in one task, on every core. Memory: about 90 bytes per token of a chunk for words, 30 for characters (max_n 5), besides the distinct n-grams. Larger chunks merge less.")
    shard_tokens: Annotated[int, Field(ge=1_000)] | None = Field(None, description="`null`: counted in the `ngrams` task. N: one `ngrams_shard` task per N tokens of each corpus (over the Dask workers), `ngrams_reduce` tasks add up their counts, `ngrams` merges them. The same bytes either way.")
    partitions: Annotated[int, Field(ge=1, le=256)] = Field(8, description="With `shard_tokens`: `ngrams_reduce` tasks per level, each holding about 1/partitions of the distinct n-grams. Raise it when a reduce runs out of memory.")


class SineParams(Section):
    """The synthetic series x_t = sin(0.01 t) + N(0, noise_std²), t = 1..T."""
    T: Annotated[int, Field(ge=2)] = Field(1000, description="Length of the series; at least `train_ar.n_train + tau + max(k_steps)`.")
    noise_std: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(0.2, description="Standard deviation of the Gaussian noise.")


class TrainArParams(Section):
    """The chapter's MLP on tau lagged values of the sine series (Adam)."""
    tau: PositiveInt = Field(4, description="Lagged values per feature vector.")
    n_train: PositiveInt = Field(600, description="The first N samples train; the rest is held out.")
    batch_size: PositiveInt = Field(16, description="Minibatch size.")
    hidden: PositiveInt = Field(10, description="Hidden units of the MLP.")
    lr: PositiveFloat = Field(0.01, description="Adam's learning rate.")
    epochs: PositiveInt = Field(5, description="Training epochs.")
    k_steps: list[PositiveInt] = Field(default=[1, 4, 16, 64], min_length=1, description="Horizons of the k-step error (MSE on the held-out range); none twice.")

    @field_validator("k_steps")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("lists a horizon twice")
        return value


class TrainLmParams(Section):
    """The character language models: one training task per model."""
    models: list[ModelName] = Field(default=["rnn_scratch", "rnn"], min_length=1, description="Any of `rnn_scratch` (the chapter's RNN from scratch), `rnn`, `gru`, `lstm`; none twice. One task each.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto`: CUDA when torch sees a GPU, else the CPU.")
    cpu_threads: PositiveInt = Field(1, description="torch's CPU threads per training (and for the other torch stages). On the CPU, cores // cpu_threads trainings run side by side; a training alone on the local runner takes every core. A param, not the machine's: the float sums, hence the results, can depend on the number of threads.")
    compile: Literal["auto", "on", "off"] = Field("auto", description="`torch.compile` the training step (CUDA graphs on a GPU). `auto`: on CUDA, for `rnn_scratch`, whose Python loop over time steps is bound by kernel launches there.")
    sampling: Literal["sequential", "random"] = Field("sequential", description="`sequential`: the state is carried between minibatches (truncated BPTT). `random`: random subsequences, the state reset per minibatch.")
    batch_size: PositiveInt = Field(32, description="Subsequences per minibatch.")
    num_steps: PositiveInt = Field(35, description="Time steps per subsequence.")
    epochs: PositiveInt = Field(500, description="Training epochs; every epoch is validated. Not used with `max_steps`.")
    optimizer: Literal["sgd", "adam", "adamw"] = Field("sgd", description="`sgd` (the chapter's), `adam` or `adamw` (with `weight_decay`).")
    lr: PositiveFloat = Field(1.0, description="Learning rate (with `max_steps`: the top of the schedule).")
    weight_decay: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = Field(0.0, description="AdamW's decoupled weight decay of the weight matrices and embeddings (not of the biases); `adamw` only.")
    beta2: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] = Field(0.999, description="Decay of Adam's and AdamW's running mean of squared gradients (torch's default 0.999). 0.99 adapts faster: small character models learn quicker early. `adam` and `adamw` only.")
    lr_decay: Annotated[float, Field(gt=0, le=1)] = Field(1.0, description="The learning rate is multiplied by this after every epoch (with `max_steps`: evaluation) without a better validation perplexity. 1: constant (the chapter's).")
    clip_theta: PositiveFloat = Field(1.0, description="Gradients are clipped to this global L2 norm.")
    hidden_scratch: PositiveInt = Field(512, description="Hidden size of `rnn_scratch`.")
    hidden: PositiveInt = Field(256, description="Hidden size of the torch layers (`rnn`, `gru`, `lstm`).")
    num_layers: PositiveInt = Field(1, description="Layers of the torch models; `rnn_scratch` has one.")
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(0.0, description="Dropout on the outputs of each torch layer while training; `rnn_scratch` has none.")
    patience: Annotated[int, Field(ge=0)] = Field(0, description="Early stopping: epochs (with `max_steps`: evaluations) without a better validation perplexity. 0: off.")
    checkpoint_every: PositiveInt = Field(50, description="Epochs (with `max_steps`: evaluations) between checkpoints in `checkpoints/<model>/`, and the last one. A killed run resumes there.")
    embedding: PositiveInt | None = Field(None, description="An input embedding of this size for the torch models (`rnn`, `gru`, `lstm`). `null`: one-hot inputs (the chapter's).")
    max_steps: PositiveInt | None = Field(None, description="Train by steps: this many optimizer steps, the batches drawn epoch after epoch, validated every `eval_every` steps; `patience`, `checkpoint_every` and `lr_decay` then count evaluations and `epochs` is not used. `null`: train `epochs` epochs.")
    eval_every: PositiveInt = Field(200, description="With `max_steps`: optimizer steps between two evaluations on the whole validation text.")
    warmup_steps: Annotated[int, Field(ge=0)] = Field(0, description="With `max_steps`: the learning rate rises linearly to `lr` over the first steps.")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="With `max_steps`: `cosine` decays `lr` to `lr_min` between the end of the warm-up and `max_steps`; `constant` keeps it.")
    lr_min: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(0.0, description="The floor of the cosine schedule.")

    @field_validator("models")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists a model twice")
        return value

    @model_validator(mode="after")
    def _schedule_fits(self) -> "TrainLmParams":
        if self.max_steps is None:
            steps_only = {"warmup_steps": self.warmup_steps != 0,
                          "lr_schedule": self.lr_schedule != "constant"}
            for key, set_ in steps_only.items():
                if set_:
                    raise ValueError(f"train_lm.{key} applies to training by steps: set "
                                     "train_lm.max_steps too")
            return self
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"train_lm.warmup_steps = {self.warmup_steps} must be below "
                             f"train_lm.max_steps = {self.max_steps}")
        if self.eval_every > self.max_steps:
            raise ValueError(f"train_lm.eval_every = {self.eval_every} exceeds train_lm.max_steps"
                             f" = {self.max_steps}: evaluations, checkpoints and patience come "
                             "every eval_every steps; set an interval within the budget")
        if self.lr_schedule == "cosine" and self.lr_min > self.lr:
            raise ValueError(f"train_lm.lr_min = {self.lr_min} exceeds train_lm.lr = {self.lr}")
        return self

    @model_validator(mode="after")
    def _decay_needs_adamw(self) -> "TrainLmParams":
        if self.beta2 != 0.999 and self.optimizer == "sgd":
            raise ValueError(f"train_lm.beta2 = {self.beta2} applies to the adam and adamw "
                             "optimizers only (train_lm.optimizer = 'sgd')")
        if self.weight_decay and self.optimizer != "adamw":
            raise ValueError(f"train_lm.weight_decay = {self.weight_decay} applies to the adamw "
                             f"optimizer only (train_lm.optimizer = {self.optimizer!r})")
        return self

    @property
    def unit(self) -> str:
        """What the history counts: `epoch` (the chapter's), or `step` when training by steps."""
        return "epoch" if self.max_steps is None else "step"

    @property
    def budget(self) -> int:
        """Epochs, or optimizer steps, to train."""
        return self.epochs if self.max_steps is None else self.max_steps

    def compiled(self, model: str, device_type: str) -> bool:
        if self.compile == "auto":
            return device_type == "cuda" and model == "rnn_scratch"
        return self.compile == "on"

    def hidden_size(self, model: str) -> int:
        return self.hidden_scratch if model == "rnn_scratch" else self.hidden

    def layers(self, model: str) -> int:
        """The scratch RNN is one hand-written layer without dropout; the settings are for the
        torch layers."""
        return 1 if model == "rnn_scratch" else self.num_layers

    def embedding_of(self, model: str) -> int | None:
        """The scratch RNN reads one-hot inputs, as the chapter wrote it."""
        return None if model == "rnn_scratch" else self.embedding

    def dropout_of(self, model: str) -> float:
        return 0.0 if model == "rnn_scratch" else self.dropout


class EvaluateParams(Section):
    """Baselines, scoring and the continuations in the report."""
    ngram_orders: list[Annotated[int, Field(ge=1, le=12)]] = Field(default=[3], min_length=1, description="Orders of the interpolated Kneser-Ney character baselines, each scored like the language models; none twice.")
    prefixes: list[Annotated[str, Field(min_length=1)]] = Field(default=["time traveller", "traveller"], min_length=1, description="Prefixes to continue. Read as the corpus is: under `preprocess.clean: letters` lower-cased, other characters -> one space; under `none` as written.")
    num_chars: PositiveInt = Field(50, description="Characters generated after each prefix.")
    temperature: PositiveFloat = Field(0.8, description="Temperature of the seeded sample beside the greedy continuation.")
    top_k: PositiveInt = Field(5, description="The sample draws from the k likeliest characters.")

    @field_validator("ngram_orders")
    @classmethod
    def _distinct_orders(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("lists an order twice")
        return value


class ExecutionParams(Section):
    """Where the stages run."""
    task_runner: Literal["local", "dask"] = Field("local", description="`local`: the stages run in threads of the `seqlm run` process. `dask`: on a Dask cluster through prefect-dask, each training on a worker with a free `GPU` resource.")
    dask_address: str | None = Field(None, description="`null`: a LocalCluster sized to this machine. `tcp://host:8786`: join that scheduler.")
    timeout_minutes: PositiveFloat | Literal["auto"] = Field("auto", description="A run still going after this many minutes ends TimedOut: its trainings stop within a batch (their last checkpoints kept), the workspace is released and the next run resumes. `auto`: 4 times the expected duration of the configured work, at least 30 minutes (seqlm/runtime/deadline.py).")

    @field_validator("timeout_minutes", mode="before")
    @classmethod
    def _minutes_or_auto(cls, value: object) -> object:
        if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool)
                               and value > 0 and value != float("inf")):
            return value
        raise ValueError("must be a number of minutes > 0, or auto")


class TrackingParams(Section):
    """MLflow's experiment and the names in the registry."""
    experiment: Annotated[str, Field(min_length=1)] = Field("seqlm", description="The MLflow experiment.")
    corpus_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")] | None = Field(None, description="Names the registered models (`<corpus_name>-<model>`) and the MLflow datasets. `null`: the file name of the first download source without its suffix (`timemachine`), with `-raw` under `preprocess.clean: none`.")


class Params(Section):
    seed: Annotated[int, Field(ge=0)] = Field(0, description="Seeds the sine noise, weight initialisation, batch order and sampling.")
    download: DownloadParams
    preprocess: PreprocessParams = PreprocessParams()
    ngrams: NgramParams = NgramParams()
    sine: SineParams = SineParams()
    train_ar: TrainArParams = TrainArParams()
    train_lm: TrainLmParams = TrainLmParams()
    evaluate: EvaluateParams = EvaluateParams()
    tracking: TrackingParams = TrackingParams()
    execution: ExecutionParams = ExecutionParams()

    @model_validator(mode="after")
    def _series_long_enough(self) -> "Params":
        ar = self.train_ar
        need = ar.n_train + ar.tau + max(ar.k_steps)
        if self.sine.T < need:
            raise ValueError(f"sine.T = {self.sine.T} is too short for train_ar: needs at least "
                             f"n_train + tau + max(k_steps) = {need}")
        return self

    @property
    def corpus_name(self) -> str:
        """tracking.corpus_name, else the first source's file name, with `-raw` for the text as
        it is (preprocess.clean: none): the chapter's cleaning and the raw text of one corpus
        train models of their own."""
        if self.tracking.corpus_name is not None:
            return self.tracking.corpus_name
        name = Path(unquote(urlparse(self.download.sources[0]).path)).stem
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-._") or "corpus"
        return f"{name}-raw" if self.preprocess.clean == "none" else name

    def section(self, dotted: str) -> object:
        """`section("train_lm.epochs")` -> the value; used to hash what a stage depends on."""
        value: object = self
        for part in dotted.split("."):
            value = getattr(value, part)
        return value

    def digest(self, keys: list[str] | None = None) -> str:
        """Stable hash of the given keys (all params when None)."""
        data = self.model_dump(mode="json") if keys is None else {
            k: _jsonable(self.section(k)) for k in sorted(keys)}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _jsonable(value: object) -> object:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; raise ParamsError with one line naming the problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        key = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if not err["loc"] or message.startswith(f"{key}."):
            # a check across sections or keys names its keys in the message itself
            raise ParamsError(f"{path}: {message}{more}") from None
        value = "" if err["type"] == "missing" else f" = {err['input']!r}"
        raise ParamsError(f"{path}: {key}{value}: {err['msg']}{more}") from None
