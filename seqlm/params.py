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
    min_freq: Annotated[int, Field(ge=0)] = Field(0, description="Tokens rarer than this map to `<unk>`.")
    reserved_tokens: list[Annotated[str, Field(min_length=1)]] = Field([], description="Placed after `<unk>` (always index 0) in the vocabularies; none twice.")
    # A perplexity needs at least one token scored after one of context: val_tokens 2 at least.
    train_tokens: PositiveInt | None = Field(10_000, description="The first N character ids train the language models. `null`: everything before the last `val_tokens` (a split of the whole corpus).")
    val_tokens: Annotated[int, Field(ge=2)] = Field(5_000, description="The next N character ids validate them.")

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
    cpu_threads: PositiveInt = Field(1, description="torch's CPU threads per training (and for the other torch stages). On the CPU, cores // cpu_threads trainings run side by side. A param, not the machine's: the float sums, hence the results, can depend on the number of threads.")
    compile: Literal["auto", "on", "off"] = Field("auto", description="`torch.compile` the training step (CUDA graphs on a GPU). `auto`: on CUDA, for `rnn_scratch`, whose Python loop over time steps is bound by kernel launches there.")
    sampling: Literal["sequential", "random"] = Field("sequential", description="`sequential`: the state is carried between minibatches (truncated BPTT). `random`: random subsequences, the state reset per minibatch.")
    batch_size: PositiveInt = Field(32, description="Subsequences per minibatch.")
    num_steps: PositiveInt = Field(35, description="Time steps per subsequence.")
    epochs: PositiveInt = Field(500, description="Training epochs; every epoch is validated.")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="`sgd` (the chapter's) or `adam`.")
    lr: PositiveFloat = Field(1.0, description="Learning rate.")
    lr_decay: Annotated[float, Field(gt=0, le=1)] = Field(1.0, description="The learning rate is multiplied by this after every epoch without a better validation perplexity. 1: constant (the chapter's).")
    clip_theta: PositiveFloat = Field(1.0, description="Gradients are clipped to this global L2 norm.")
    hidden_scratch: PositiveInt = Field(512, description="Hidden size of `rnn_scratch`.")
    hidden: PositiveInt = Field(256, description="Hidden size of the torch layers (`rnn`, `gru`, `lstm`).")
    num_layers: PositiveInt = Field(1, description="Layers of the torch models; `rnn_scratch` has one.")
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(0.0, description="Dropout on the outputs of each torch layer while training; `rnn_scratch` has none.")
    patience: Annotated[int, Field(ge=0)] = Field(0, description="Early stopping: epochs without a better validation perplexity. 0: off (all `epochs` train).")
    checkpoint_every: PositiveInt = Field(50, description="Epochs between checkpoints in `checkpoints/<model>/` (and the last epoch). A killed run resumes there.")

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
    """Baselines, scoring and the continuations in the report."""
    ngram_orders: list[Annotated[int, Field(ge=1, le=12)]] = Field(default=[3], min_length=1, description="Orders of the interpolated Kneser-Ney character baselines, each scored like the language models; none twice.")
    prefixes: list[Annotated[str, Field(min_length=1)]] = Field(default=["time traveller", "traveller"], min_length=1, description="Prefixes to continue. Normalised as the corpus is (lower case, other characters -> one space) before use.")
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


class TrackingParams(Section):
    """MLflow's experiment and the names in the registry."""
    experiment: Annotated[str, Field(min_length=1)] = Field("seqlm", description="The MLflow experiment.")
    corpus_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")] | None = Field(None, description="Names the registered models (`<corpus_name>-<model>`) and the MLflow datasets. `null`: the file name of the first download source without its suffix (`timemachine`).")


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
