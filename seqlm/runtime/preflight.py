"""Checks that stop a run early, each with one line naming the params key.

`check_machine` needs only params.yaml and this machine, and runs before anything starts.
`check_corpus` needs the corpus's length and vocabularies, and runs as soon as preprocess has
written them, before any later stage: a split, a batch shape or a prefix that does not fit
fails in seconds instead of after the trainings. (N-gram orders fit any vocabulary: their keys
take as many int64 words as the ids need, seqlm.ngrams.)
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from seqlm.params import GATES, Params
from seqlm.threads import cuda_available

if TYPE_CHECKING:
    from seqlm.text import Vocab

MEMORY_SHARE = 0.8            # of the memory available now, for one training


class PreflightError(ValueError):
    """A param does not fit the machine or the corpus; the message names the key."""


def check_machine(params: Params) -> None:
    p = params.train_lm
    if p.device == "cuda" and not cuda_available():
        import torch
        raise PreflightError(f"train_lm.device = 'cuda' but torch {torch.__version__} sees no "
                             "CUDA GPU; set train_lm.device to 'auto' or 'cpu'")
    out = Path(params.download.out)
    if out.is_dir():
        raise PreflightError(f"download.out = {params.download.out!r} is a folder; name the file "
                             "to store the corpus in, e.g. data/raw/timemachine.txt")
    check_dask_address(params.execution.dask_address
                       if params.execution.task_runner == "dask" else None)
    available = _available_memory(p.device)
    for model in p.models:
        weights, activations = training_memory(params, model)
        need = weights + activations
        if need > MEMORY_SHARE * available:
            key = (f"train_lm.batch_size x train_lm.num_steps = {p.batch_size} x {p.num_steps}"
                   if activations > weights else
                   f"{'train_lm.hidden_scratch' if model == 'rnn_scratch' else 'train_lm.hidden'}"
                   f" = {p.hidden_size(model)}")
            raise PreflightError(
                f"{key}: training {model} needs about {need / 2**30:,.1f} GiB, and this machine "
                f"has {available / 2**30:,.1f} GiB available; lower it")
    check_disk(params)


def check_dask_address(address: str | None) -> None:
    """A scheduler address that nothing answers on fails now, in milliseconds where the port
    is refused (Dask itself waits 30 s and does not name the key)."""
    if address is None:
        return
    import socket
    from urllib.parse import urlparse
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    key = f"execution.dask_address = {address!r}"
    try:
        port = parsed.port
    except ValueError:
        port = None
    if not parsed.hostname or port is None:
        raise PreflightError(f"{key}: expected tcp://HOST:PORT (e.g. tcp://127.0.0.1:8786)")
    try:
        socket.create_connection((parsed.hostname, port), timeout=5).close()
    except OSError as exc:
        raise PreflightError(f"{key}: no Dask scheduler answers there ({exc.strerror or exc}); "
                             "start `dask scheduler`, or unset it for a local cluster") from None


def check_dvc_lock(path: Path = Path("dvc.lock")) -> None:
    """A damaged dvc.lock (a truncated write, a bad merge) fails now with the fix, not after
    every stage ran, in `dvc commit`. Checked against the schema DVC itself reads it with."""
    import yaml
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA
    from voluptuous import Invalid
    if not path.exists():
        return
    try:
        COMPILED_LOCKFILE_SCHEMA(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, UnicodeDecodeError, Invalid) as exc:
        problem = " ".join(str(exc).split())
        raise PreflightError(f"{path}: not a valid DVC lock file ({problem}); remove it (the "
                             "run writes it again from the stages' outputs) or restore it with "
                             "`git checkout dvc.lock`") from None


def weight_count(params: Params, model: str, vocab_size: int = 100) -> int:
    """Parameters of `model` (an embedding, input, recurrent and output weights and biases)."""
    p = params.train_lm
    hidden, layers, gates = p.hidden_size(model), p.layers(model), GATES[model]
    embedding = p.embedding_of(model)
    inputs = embedding or vocab_size
    return gates * hidden * (inputs + hidden + 2) + (layers - 1) * gates * hidden * \
        (2 * hidden + 2) + hidden * vocab_size + vocab_size + vocab_size * (embedding or 0)


def training_memory(params: Params, model: str, vocab_size: int = 100) -> tuple[float, float]:
    """Bytes a training of `model` holds, roughly: for the weights (with gradients, two
    optimizer moments and two copies: best epoch, checkpoint) and for the activations of one
    batch kept for backpropagation through time."""
    p = params.train_lm
    hidden, layers, gates = p.hidden_size(model), p.layers(model), GATES[model]
    activations = p.batch_size * p.num_steps * (layers * (gates + 2) * hidden + 3 * vocab_size)
    return 4.0 * 6 * weight_count(params, model, vocab_size), 4.0 * activations


def _size_key(params: Params, model: str) -> str:
    p = params.train_lm
    if p.layers(model) > 1:
        return f"train_lm.num_layers = {p.layers(model)}"
    return (f"{'train_lm.hidden_scratch' if model == 'rnn_scratch' else 'train_lm.hidden'} = "
            f"{p.hidden_size(model)}")


def checkpoint_bytes(params: Params, model: str) -> float:
    """A checkpoint holds the weights twice (current and best epoch), the optimizer's state
    (Adam: two moments; SGD: none) and the history; the published model.pt once more."""
    copies = 2 + (2 if params.train_lm.optimizer in ("adam", "adamw") else 0)
    return 4.0 * copies * weight_count(params, model)


def check_disk(params: Params, folder: Path = Path("checkpoints")) -> None:
    """The checkpoints and models of every training must fit the disk they go to."""
    need = sum(checkpoint_bytes(params, m) + 4.0 * weight_count(params, m)
               for m in params.train_lm.models)
    existing = next(f for f in (folder, *folder.absolute().parents) if f.exists())
    free = shutil.disk_usage(existing).free
    if need > free:
        model = max(params.train_lm.models, key=lambda m: weight_count(params, m))
        raise PreflightError(
            f"{_size_key(params, model)}: the checkpoints and models of this run need about "
            f"{need / 2**30:,.2f} GiB, and the disk of {folder}/ has {free / 2**30:,.2f} GiB "
            "free; lower it or free the disk")


LONG_TRAINING_S = 3600.0       # a run expected to train longer is announced with its estimate
# More than a CPU core does with these products (~70 GFLOP/s measured for hidden 512 on AVX-512):
# a training shorter than LONG_TRAINING_S even at this rate needs no probe, nor torch loaded.
FASTEST_CORE_FLOPS = 1e12


def training_seconds(params: Params, model: str, flops_per_s: float,
                     corpus_chars: int = 170_000) -> float:
    """Seconds a training of `model` from scratch takes at `flops_per_s`, roughly: 6 FLOPs per
    weight and token (forward and backward) for every token trained on, plus the validations
    (forward only): every epoch's, or by steps every eval_every steps'. `corpus_chars` sizes
    an epoch where train_tokens is null (a split of the whole corpus)."""
    return 2 * weight_count(params, model) * _token_passes(params, corpus_chars) / flops_per_s


def _token_passes(params: Params, corpus_chars: int = 170_000) -> float:
    """Tokens trained on, three times (forward and backward), plus the tokens validated."""
    p, pre = params.train_lm, params.preprocess
    if p.max_steps is not None:
        evaluations = -(-p.max_steps // p.eval_every)
        return 3 * p.max_steps * p.batch_size * p.num_steps + evaluations * pre.val_tokens
    return p.epochs * (3 * (pre.train_tokens or corpus_chars) + pre.val_tokens)


def matmul_flops_per_s(hidden: int, batch: int, seconds: float = 0.05) -> float:
    """What this machine does with matrix products of a recurrent step's shape (batch x hidden
    by hidden x hidden) in one thread, measured for `seconds`."""
    import torch
    with _one_thread():
        x, w = torch.randn(batch, hidden), torch.randn(hidden, hidden)
        done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            x @ w
            done += 1
    return 2.0 * batch * hidden * hidden * done / elapsed


@contextlib.contextmanager
def _one_thread():
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def warn_long_trainings(params: Params, log: logging.Logger | logging.LoggerAdapter) -> None:
    """A training expected to take more than an hour here is announced before it starts, with
    the estimate and the key that makes it long (on the CPU; a GPU's speed is not probed)."""
    p = params.train_lm
    if p.device != "cpu" and cuda_available():
        return
    for model in p.models:
        if training_seconds(params, model, FASTEST_CORE_FLOPS) <= LONG_TRAINING_S:
            continue
        rate = matmul_flops_per_s(p.hidden_size(model), p.batch_size)
        seconds = training_seconds(params, model, rate)
        if seconds > LONG_TRAINING_S:
            tokens_per_s = _token_passes(params) / 3 / seconds
            log.warning("%s: training %s from scratch takes about %.1f h on this machine's "
                        "CPU (~%s tokens/s, %d %ss), checkpoints of ~%s MiB",
                        _size_key(params, model), model, seconds / 3600,
                        f"{tokens_per_s:,.0f}", p.budget, p.unit,
                        f"{checkpoint_bytes(params, model) / 2**20:,.0f}")


def _available_memory(device: str) -> float:
    import psutil
    if device in ("auto", "cuda") and cuda_available():
        import torch
        free, _total = torch.cuda.mem_get_info()
        return float(free)
    return float(psutil.virtual_memory().available)


def check_preprocessed(params: Params) -> None:
    """check_corpus on what the preprocess stage wrote."""
    from seqlm.stages import CORPUS, VOCAB
    from seqlm.text import Vocab
    for path in (CORPUS["char"], *VOCAB.values()):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: not found (run the preprocess stage first)")
    check_corpus(params, np.load(CORPUS["char"], mmap_mode="r"),
                 {level: Vocab.load(path) for level, path in VOCAB.items()})


def check_corpus(params: Params, corpus: np.ndarray, vocabs: dict[str, Vocab]) -> None:
    """Checks against the preprocessed corpus (char ids) and the vocabularies by level."""
    from seqlm import protocol
    from seqlm.loaders import BATCHES_PER_EPOCH
    from seqlm.text import normalize_prefix
    try:
        pre = params.preprocess
        split = protocol.split_of(len(corpus), pre.train_tokens, pre.val_tokens, pre.test_tokens)
    except protocol.SplitError as exc:
        raise PreflightError(str(exc)) from None
    lm = params.train_lm
    if BATCHES_PER_EPOCH[lm.sampling](split.train_end, lm.batch_size, lm.num_steps) < 1:
        raise PreflightError(
            f"train_lm.batch_size = {lm.batch_size} x train_lm.num_steps = {lm.num_steps} do not "
            f"fit the training split of {split.train_end} characters "
            "(preprocess.train_tokens): an epoch would have no batch")
    known = set(vocabs["char"].idx_to_token)
    for prefix in params.evaluate.prefixes:
        missing = sorted(set(normalize_prefix(prefix, params.preprocess.clean)) - known)
        if missing:
            raise PreflightError(f"evaluate.prefixes: {prefix!r} has characters the corpus "
                                 f"never uses: {''.join(missing)!r}")
