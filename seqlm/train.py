"""Training loop of the character language models (d2l train_ch8 semantics, without its per-step
host synchronisation), validation perplexity, and resumable checkpoints."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seqlm import loaders, models
from seqlm.io import atomic_path, file_digest
from seqlm.loaders import BATCHES_PER_EPOCH, LOADERS, LoaderSizeError
from seqlm.models import build_model, check_model_name, detach_state
from seqlm.params import Params
from seqlm.text import Vocab

log = logging.getLogger(__name__)
CHECKPOINTS = Path("checkpoints")        # outside the DVC outs: `dvc repro` deletes outs first
HISTORY_COLUMNS = ("epoch", "train_perplexity", "val_perplexity", "tokens_per_s")
EpochCallback = Callable[[int, dict[str, float]], None]


class TrainingError(RuntimeError):
    """Training cannot start or continue; the message is one line naming the cause."""


class CheckpointError(TrainingError):
    """A checkpoint file is unreadable or belongs to another vocabulary."""


@dataclass
class TrainResult:
    model: nn.Module
    config: dict                        # what the run's result depends on (hashed into checkpoints)
    history: list[dict[str, float]]     # one row per epoch, HISTORY_COLUMNS
    device: torch.device
    wall_s: float                       # training + validation seconds, over all resumed runs
    resumed_from: int                   # epochs restored from a checkpoint (0: fresh start)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"train_lm.device = 'cuda' but torch {torch.__version__} sees no CUDA "
                            "GPU; set train_lm.device to 'auto' or 'cpu'")
    if name not in ("cpu", "cuda"):
        raise TrainingError(f"train_lm.device = {name!r}: expected auto, cpu or cuda")
    return torch.device(name)


def num_layers(name: str, params: Params) -> int:
    """The scratch RNN is one hand-written layer; train_lm.num_layers is for the torch layers."""
    return 1 if name == "rnn_scratch" else params.train_lm.num_layers


def clip_gradients(parameters: Sequence[nn.Parameter], theta: float) -> torch.Tensor:
    """d2l grad_clipping: if the global L2 norm exceeds theta, scale every gradient by theta/norm.
    The condition is a min() on the device, so no step waits for the host; returns the norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    scale = torch.clamp(theta / norm, max=1.0)      # norm 0 -> 1; a NaN norm is caught per epoch
    torch._foreach_mul_(grads, scale)
    return norm


def perplexity(model: nn.Module, ids: np.ndarray | torch.Tensor, device: torch.device | str,
               batch_size: int, num_steps: int) -> float:
    """exp(mean cross-entropy) of predicting ids[1:] from ids[:-1]: the sequence is cut into
    batch_size contiguous rows read num_steps at a time with the state carried, so every token
    but the last (n - 1) % batch_size ones is scored exactly once."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    if eval_batches(len(ids), batch_size, num_steps) < 1:
        raise LoaderSizeError(f"batch_size={batch_size} x num_steps={num_steps} needs more than "
                              f"the {len(ids)} tokens available: no full batch to evaluate")
    row = (len(ids) - 1) // batch_size
    xs = ids[:row * batch_size].reshape(batch_size, row)
    ys = ids[1:row * batch_size + 1].reshape(batch_size, row)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        state = model.begin_state(batch_size, device)
        for i in range(0, row, num_steps):          # the last window may be shorter
            logits, state = model(xs[:, i:i + num_steps], state)
            total += F.cross_entropy(logits, ys[:, i:i + num_steps].T.reshape(-1), reduction="sum")
    model.train(was_training)
    return _exp(total.item() / (row * batch_size))


def eval_batches(n_tokens: int, batch_size: int, num_steps: int) -> int:
    """Full batches that perplexity() reads from n_tokens ids (it also reads a shorter last one)."""
    return (n_tokens - 1) // batch_size // num_steps


def train(name: str, corpus: np.ndarray, vocab: Vocab, params: Params, *,
          checkpoint_dir: Path | str | None = None, on_epoch: EpochCallback | None = None,
          ) -> TrainResult:
    """Train model `name` on the first preprocess.train_tokens ids of `corpus`, validating on the
    next val_tokens, for train_lm.epochs epochs; resume from checkpoint_dir/last.pt when it holds
    the same run. `on_epoch(epoch, metrics)` sees every epoch of the history, restored ones
    included, in order."""
    p = params.train_lm
    check_model_name(name)
    device = resolve_device(p.device)
    train_ids, val_ids = split(corpus, params)
    _check_split("train", len(train_ids), params, BATCHES_PER_EPOCH[p.sampling])
    _check_split("val", len(val_ids), params, eval_batches)
    if int(corpus.max()) >= len(vocab):
        raise TrainingError(f"corpus holds token id {int(corpus.max())} but the vocabulary has "
                            f"{len(vocab)} tokens: the corpus and vocabulary files do not match")

    config = run_config(name, params, vocab, device, np.concatenate([train_ids, val_ids]))
    config_hash = _hash(config)
    torch.manual_seed(params.seed)
    model = build_model(name, len(vocab), config["hidden"], config["num_layers"]).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=p.lr)
    history: list[dict[str, float]] = []
    wall_s = 0.0

    ckpt_path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None
    if ckpt_path is not None and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, vocab, device)
        if ckpt["config_hash"] != config_hash:
            log.warning("%s: checkpoint of another configuration (%s); starting %s afresh",
                        ckpt_path, _config_diff(ckpt.get("config", {}), config), name)
        elif ckpt["epoch"] > p.epochs:
            log.warning("%s: checkpoint is at epoch %d, past train_lm.epochs = %d; "
                        "starting %s afresh", ckpt_path, ckpt["epoch"], p.epochs, name)
        else:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(ckpt["torch_rng"].cpu())
            history, wall_s = ckpt["history"], ckpt["wall_s"]
            log.info("%s: resuming %s from epoch %d", ckpt_path, name, ckpt["epoch"])
    resumed_from = len(history)
    if on_epoch is not None:
        for row in history:
            on_epoch(int(row["epoch"]), _metrics(row))

    train_t = torch.as_tensor(train_ids, dtype=torch.long, device=device)   # on the device once
    val_t = torch.as_tensor(val_ids, dtype=torch.long, device=device)
    for epoch in range(resumed_from + 1, p.epochs + 1):
        start = time.perf_counter()
        rng = np.random.default_rng([params.seed, epoch])    # a resumed run sees the same batches
        loss, tokens = _train_epoch(model, optimizer, train_t, rng, p.sampling, p.batch_size,
                                    p.num_steps, p.clip_theta)
        train_s = time.perf_counter() - start       # the loss.item() above waited for the device
        if not math.isfinite(loss):
            raise TrainingError(f"{name}: training loss is {loss} at epoch {epoch} "
                                f"(train_lm.lr = {p.lr}); lower the learning rate")
        row = {"epoch": epoch, "train_perplexity": _exp(loss),
               "val_perplexity": perplexity(model, val_t, device, p.batch_size, p.num_steps),
               "tokens_per_s": tokens / train_s}
        history.append(row)
        wall_s += time.perf_counter() - start
        if on_epoch is not None:
            on_epoch(epoch, _metrics(row))
        if ckpt_path is not None and (epoch % p.checkpoint_every == 0 or epoch == p.epochs):
            save_checkpoint(ckpt_path, model, optimizer, epoch, history, wall_s, config,
                            config_hash, vocab.fingerprint())
            log.info("%s epoch %d: train ppl %.3f, val ppl %.3f, %.0f tokens/s; checkpoint %s",
                     name, epoch, row["train_perplexity"], row["val_perplexity"],
                     row["tokens_per_s"], ckpt_path)
    return TrainResult(model, config, history, device, wall_s, resumed_from)


def _train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, corpus: torch.Tensor,
                 rng: np.random.Generator, sampling: str, batch_size: int, num_steps: int,
                 theta: float) -> tuple[float, int]:
    """One pass over the data (d2l train_epoch_ch8); returns the mean loss and the token count.
    The loss is summed on the device and read once, at the end."""
    model.train()
    parameters = list(model.parameters())
    loss_sum = torch.zeros((), dtype=torch.float64, device=corpus.device)
    tokens, state = 0, None
    for X, Y in LOADERS[sampling](corpus, batch_size, num_steps, rng):
        if state is None or sampling == "random":
            state = model.begin_state(X.shape[0], corpus.device)  # random: batches are not adjacent
        else:
            state = detach_state(state)                           # truncated BPTT
        logits, state = model(X, state)
        y = Y.T.reshape(-1)                                       # time-major, as the logits
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(parameters, theta)
        optimizer.step()
        loss_sum += loss.detach() * y.numel()
        tokens += y.numel()
    return loss_sum.item() / tokens, tokens


def split(corpus: np.ndarray, params: Params) -> tuple[np.ndarray, np.ndarray]:
    """The train and validation ids: corpus[:train_tokens], corpus[train_tokens:+val_tokens]."""
    n_train, n_val = params.preprocess.train_tokens, params.preprocess.val_tokens
    if n_train + n_val > len(corpus):
        raise TrainingError(f"preprocess.train_tokens + preprocess.val_tokens = {n_train} + "
                            f"{n_val} exceeds the corpus of {len(corpus)} tokens")
    return corpus[:n_train], corpus[n_train:n_train + n_val]


def _check_split(which: str, n_tokens: int, params: Params,
                 batches: Callable[[int, int, int], int]) -> None:
    p = params.train_lm
    if batches(n_tokens, p.batch_size, p.num_steps) < 1:
        raise LoaderSizeError(
            f"{which} split (preprocess.{which}_tokens = {n_tokens}) is too small for "
            f"train_lm.batch_size = {p.batch_size} x train_lm.num_steps = {p.num_steps}: "
            "an epoch would have no batch")


def run_config(name: str, params: Params, vocab: Vocab, device: torch.device,
               data: np.ndarray) -> dict:
    """Everything the trajectory of a run depends on. `epochs` and `checkpoint_every` are left
    out on purpose: they decide where a run stops, not what it computes, so a longer run resumes
    a shorter one. The code of the model, loop and loaders is in, as in the DVC stage's deps."""
    p = params.train_lm
    return {
        "model": name, "vocab_size": len(vocab), "hidden": p.hidden_size(name),
        "num_layers": num_layers(name, params), "seed": params.seed,
        "train_tokens": params.preprocess.train_tokens, "val_tokens": params.preprocess.val_tokens,
        "sampling": p.sampling, "batch_size": p.batch_size, "num_steps": p.num_steps,
        "lr": p.lr, "clip_theta": p.clip_theta, "device": device.type,
        "data": hashlib.sha256(np.asarray(data, dtype=np.int64).tobytes()).hexdigest()[:16],
        "code": {Path(f).name: file_digest(f)[:16]
                 for f in (models.__file__, loaders.__file__, __file__)},
    }


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                    history: list[dict[str, float]], wall_s: float, config: dict,
                    config_hash: str, vocab_fingerprint: str) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "history": history, "wall_s": wall_s, "torch_rng": torch.get_rng_state(),
             "config": config, "config_hash": config_hash, "vocab_fingerprint": vocab_fingerprint}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, vocab: Vocab, device: torch.device) -> dict:
    """Read a checkpoint; refuse, naming the file, an unreadable one or one of another vocab."""
    keys = {"model", "optimizer", "epoch", "history", "wall_s", "torch_rng", "config_hash",
            "vocab_fingerprint"}
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(ckpt, dict) or not keys <= ckpt.keys():
            raise ValueError("not a training checkpoint")
    except Exception as exc:  # torch.load fails in many ways (zip, pickle, EOF); all mean "corrupt"
        reason = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {reason}); "
                              "delete it to train from scratch") from None
    if ckpt["vocab_fingerprint"] != vocab.fingerprint():
        raise CheckpointError(f"{path}: checkpoint was trained on another vocabulary (fingerprint "
                              f"{ckpt['vocab_fingerprint']}, data has {vocab.fingerprint()}); "
                              "delete it to train from scratch")
    return ckpt


def _metrics(row: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "epoch"}


def _exp(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf     # math.exp overflows past ~709


def _hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _config_diff(old: dict, new: dict) -> str:
    changed = sorted(k for k in new.keys() | old.keys() if old.get(k) != new.get(k))
    return "differs in " + ", ".join(changed) if changed else "different hash"
