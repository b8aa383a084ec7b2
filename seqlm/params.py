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
    sources: list[str] = Field(min_length=1)
    # None: the source's content may change; every run fetches it and records its sha256.
    checksum: str | None = None
    out: str
    connect_timeout_s: PositiveFloat = 5.0
    read_timeout_s: PositiveFloat = 30.0
    retries: Annotated[int, Field(ge=0, le=10)] = 2

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
    min_freq: Annotated[int, Field(ge=0)] = 0
    reserved_tokens: list[Annotated[str, Field(min_length=1)]] = []
    # The first train_tokens character ids train, the next val_tokens validate; None trains on
    # everything before the last val_tokens (a split of the whole corpus). A perplexity needs
    # at least one token scored after one of context: 2 at least.
    train_tokens: PositiveInt | None = 10_000
    val_tokens: Annotated[int, Field(ge=2)] = 5_000

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
    max_n: Annotated[int, Field(ge=1, le=10)] = 3
    chunk_tokens: Annotated[int, Field(ge=1_000)] = 16_000_000
    shard_tokens: Annotated[int, Field(ge=1_000)] | None = None
    partitions: Annotated[int, Field(ge=1, le=256)] = 8


class SineParams(Section):
    T: Annotated[int, Field(ge=2)] = 1000
    noise_std: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.2


class TrainArParams(Section):
    tau: PositiveInt = 4
    n_train: PositiveInt = 600
    batch_size: PositiveInt = 16
    hidden: PositiveInt = 10
    lr: PositiveFloat = 0.01
    epochs: PositiveInt = 5
    k_steps: list[PositiveInt] = Field(default=[1, 4, 16, 64], min_length=1)

    @field_validator("k_steps")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("lists a horizon twice")
        return value


class TrainLmParams(Section):
    models: list[ModelName] = Field(default=["rnn_scratch", "rnn"], min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch's CPU threads per training (and for the other torch stages); on the CPU, trainings
    # run side by side, cores // cpu_threads at a time. A param, not the machine's: the float
    # sums, hence the results, can depend on the number of threads.
    cpu_threads: PositiveInt = 1
    # torch.compile the training step (CUDA graphs on a GPU); auto: on CUDA, for the scratch
    # RNN, whose Python loop over time steps is bound by kernel launches there.
    compile: Literal["auto", "on", "off"] = "auto"
    sampling: Literal["sequential", "random"] = "sequential"
    batch_size: PositiveInt = 32
    num_steps: PositiveInt = 35
    epochs: PositiveInt = 500
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: PositiveFloat = 1.0
    # After every epoch without a better validation perplexity the learning rate is multiplied
    # by lr_decay (1: constant, the chapter's).
    lr_decay: Annotated[float, Field(gt=0, le=1)] = 1.0
    clip_theta: PositiveFloat = 1.0
    hidden_scratch: PositiveInt = 512
    hidden: PositiveInt = 256
    num_layers: PositiveInt = 1
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0   # torch layers only
    patience: Annotated[int, Field(ge=0)] = 0            # epochs without a better val ppl; 0: off
    checkpoint_every: PositiveInt = 50

    @field_validator("models")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists a model twice")
        return value

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

    def dropout_of(self, model: str) -> float:
        return 0.0 if model == "rnn_scratch" else self.dropout


class EvaluateParams(Section):
    # Orders of the Kneser-Ney character baselines, each scored like the language models.
    ngram_orders: list[Annotated[int, Field(ge=1, le=12)]] = Field(default=[3], min_length=1)
    # Normalised as the corpus is (lower case, other characters -> one space) before use.
    prefixes: list[Annotated[str, Field(min_length=1)]] = Field(
        default=["time traveller", "traveller"], min_length=1)
    num_chars: PositiveInt = 50
    temperature: PositiveFloat = 0.8
    top_k: PositiveInt = 5

    @field_validator("ngram_orders")
    @classmethod
    def _distinct_orders(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("lists an order twice")
        return value


class ExecutionParams(Section):
    # local: the stages run in threads of the `seqlm run` process. dask: on a Dask cluster
    # through prefect-dask, each training on a worker with a free `GPU` resource.
    task_runner: Literal["local", "dask"] = "local"
    # None: a LocalCluster sized to this machine; "tcp://host:8786": join that scheduler.
    dask_address: str | None = None
    timeout_minutes: PositiveFloat | Literal["auto"] = Field(
        "auto", description="A run still going after this many minutes ends TimedOut: its "
        "trainings stop within a batch (their last checkpoints kept), the workspace is released "
        "and the next run resumes. auto: 4 times the expected duration of the configured work, "
        "at least 30 minutes (seqlm/runtime/deadline.py).")

    @field_validator("timeout_minutes", mode="before")
    @classmethod
    def _minutes_or_auto(cls, value: object) -> object:
        if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool)
                               and value > 0 and value != float("inf")):
            return value
        raise ValueError("must be a number of minutes > 0, or auto")


class TrackingParams(Section):
    experiment: Annotated[str, Field(min_length=1)] = "seqlm"
    # Names the registered models (<corpus_name>-<model>) and the MLflow datasets; None: the
    # file name of the first download source without its suffix.
    corpus_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")] | None = None


class Params(Section):
    seed: Annotated[int, Field(ge=0)] = 0
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
        if self.tracking.corpus_name is not None:
            return self.tracking.corpus_name
        name = Path(unquote(urlparse(self.download.sources[0]).path)).stem
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-._") or "corpus"

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
        if not err["loc"]:  # a check across sections names its keys in the message itself
            raise ParamsError(f"{path}: {err['msg'].removeprefix('Value error, ')}{more}") from None
        key = ".".join(str(p) for p in err["loc"])
        value = "" if err["type"] == "missing" else f" = {err['input']!r}"
        raise ParamsError(f"{path}: {key}{value}: {err['msg']}{more}") from None
