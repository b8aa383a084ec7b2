"""Training loop of the character language models (d2l train_ch8 semantics, without its per-step
host synchronisation), validation perplexity, and resumable checkpoints.

Two units of training. By epochs (the chapter's): every epoch is one pass over the training text,
validated at its end. By steps (`train_lm.max_steps`, for long corpora): optimizer steps over the
same batches, epoch after epoch, with a learning-rate schedule (warm-up, cosine decay), validated
every `eval_every` steps. Either way a history row is one validated round, and patience,
checkpoints and learning-rate decay count rounds."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seqlm import interrupt, loaders, models, protocol
from seqlm.io import file_digest, save_torch
from seqlm.loaders import BATCHES_PER_EPOCH, LOADERS, LoaderSizeError
from seqlm.models import build_model, detach_state
from seqlm.params import Params, TrainLmParams, check_model_name
from seqlm.text import Vocab
from seqlm.threads import cores, in_background, lower_priority, use_cpu_threads, yields_cores

log = logging.getLogger(__name__)
# What history.csv keeps: the same for every run of the same params, code and machine. Timings
# (tokens_per_s, seconds) are in the rows too but reach only the callback, MLflow and the logs.
HISTORY_COLUMNS = ("epoch", "train_perplexity", "val_perplexity")
STEP_HISTORY_COLUMNS = ("step", *HISTORY_COLUMNS)    # by steps: `epoch` is passes made, a float
EVAL_CHUNK = 256                         # validation steps per forward call (bounds memory)
VALIDATIONS_AHEAD = 2                    # epochs trained ahead of their validation, at most
EpochCallback = Callable[[int, dict[str, float]], None]      # (epoch or step, metrics)
ProgressCallback = Callable[[int, float], None]               # (step, train perplexity so far)
PROGRESS_EVERY = 10           # by steps: the steps between two progress reports (one host sync)


class TrainingError(RuntimeError):
    """Training cannot start or continue; the message is one line naming the cause."""


class CheckpointError(TrainingError):
    """A checkpoint file is unreadable."""


@dataclass
class TrainResult:
    model: nn.Module                    # the last epoch's weights
    best_state: dict[str, torch.Tensor]  # the best-validation epoch's weights, on the CPU
    config: dict                        # what the run's result depends on (hashed into checkpoints)
    history: list[dict[str, float]]     # per epoch: HISTORY_COLUMNS, tokens_per_s, seconds
    device: torch.device
    resumed_from: int                   # epochs restored from a checkpoint (0: fresh start)
    stopped_early: bool                 # train_lm.patience epochs passed without a better one
    validation_digest: str              # what the validation perplexities were measured on

    @property
    def best(self) -> dict[str, float]:
        return best_row(self.history)

    @property
    def wall_s(self) -> float:
        """Training + validation seconds over every run that built this history."""
        return sum(row["seconds"] for row in self.history)


def best_row(history: list[dict[str, float]]) -> dict[str, float]:
    """The epoch with the lowest validation perplexity (the earliest of equal ones)."""
    return min(history, key=lambda row: row["val_perplexity"])


def patience_exhausted(history: list[dict[str, float]], patience: int) -> bool:
    """Early stopping: `patience` rounds (epochs, or evaluations) have passed since the best
    one (0: never)."""
    if not (patience and history):
        return False
    best = min(range(len(history)), key=lambda i: history[i]["val_perplexity"])
    return len(history) - 1 - best >= patience


def learning_rate(history: list[dict[str, float]], lr: float, decay: float) -> float:
    """The learning rate of the next round: lr, times `decay` for every round so far that did
    not improve the best validation perplexity. A function of the history, so a resumed run
    continues the schedule exactly."""
    best, misses = math.inf, 0
    for row in history:
        if row["val_perplexity"] < best:
            best = row["val_perplexity"]
        else:
            misses += 1
    return lr * decay ** misses


def scheduled_lr(step: int, p: TrainLmParams) -> float:
    """By steps: the learning rate of step `step` (0-based) before any decay: a linear warm-up
    over warmup_steps, then constant, or a cosine from lr down to lr_min at max_steps."""
    if step < p.warmup_steps:
        return p.lr * (step + 1) / p.warmup_steps
    if p.lr_schedule == "constant" or p.max_steps is None:
        return p.lr
    progress = (step - p.warmup_steps) / (p.max_steps - p.warmup_steps)
    return p.lr_min + 0.5 * (p.lr - p.lr_min) * (1 + math.cos(math.pi * progress))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"train_lm.device = 'cuda' but torch {torch.__version__} sees no CUDA "
                            "GPU; set train_lm.device to 'auto' or 'cpu'")
    if name not in ("cpu", "cuda"):
        raise TrainingError(f"train_lm.device = {name!r}: expected auto, cpu or cuda")
    return torch.device(name)


def clip_gradients(parameters: Sequence[nn.Parameter], theta: float) -> torch.Tensor:
    """d2l grad_clipping: if the global L2 norm exceeds theta, scale every gradient by theta/norm.
    The condition is a min() on the device, so no step waits for the host; returns the norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    scale = torch.clamp(theta / norm, max=1.0)      # norm 0 -> 1; a NaN norm is caught per epoch
    torch._foreach_mul_(grads, scale)
    return norm


def perplexity(model: nn.Module, text: np.ndarray | torch.Tensor, first: int,
               device: torch.device | str) -> float:
    """exp(mean cross-entropy) of text[first:], each token predicted from the text before it, by
    the evaluation protocol of seqlm.protocol (text = protocol.validation_text(...), first = the
    context length in front of the scored tokens). One host sync, at the end."""
    nll, _, mask = _window_nll(model, text, first, device)
    return _exp((nll * mask).sum(dtype=torch.float64).item() / (len(text) - first))


def token_nll(model: nn.Module, text: np.ndarray | torch.Tensor, first: int,
              device: torch.device | str) -> np.ndarray:
    """-log P(text[i] | text before it) for i = first..len(text)-1, in order: what perplexity()
    averages, token by token."""
    nll, positions, mask = _window_nll(model, text, first, device)
    out = np.empty(len(text) - first)
    out[(positions[mask] - first).cpu().numpy()] = nll[mask].double().cpu().numpy()
    return out


def _window_nll(model: nn.Module, text: np.ndarray | torch.Tensor, first: int,
                device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    text = torch.as_tensor(text, dtype=torch.long, device=device)
    X, Y, positions, mask = protocol.windows(text, first)
    was_training = model.training
    model.eval()
    chunks = []
    with torch.no_grad():
        state = model.begin_state(X.shape[0], device)
        for i in range(0, X.shape[1], EVAL_CHUNK):
            cols = slice(i, i + EVAL_CHUNK)
            logits, state = model(X[:, cols], state)          # time-major rows
            nll = F.cross_entropy(logits, Y[:, cols].T.reshape(-1), reduction="none")
            chunks.append(nll.reshape(-1, X.shape[0]).T)     # back to (rows, steps)
    model.train(was_training)
    return torch.cat(chunks, dim=1), positions, mask


def val_perplexity(model: nn.Module, corpus: np.ndarray, split: protocol.Split,
                   device: torch.device | str) -> float:
    """The validation perplexity of `model` on `split` of `corpus` (the protocol's numbers)."""
    return perplexity(model, protocol.validation_text(corpus, split),
                      split.val_start - split.context_start, device)


def split_of(corpus: np.ndarray, params: Params) -> protocol.Split:
    """The train/validation split of params.preprocess over `corpus`."""
    p = params.preprocess
    try:
        return protocol.split_of(len(corpus), p.train_tokens, p.val_tokens, p.test_tokens)
    except protocol.SplitError as exc:
        raise TrainingError(str(exc)) from None


def build_optimizer(model: nn.Module, params: Params) -> torch.optim.Optimizer:
    p = params.train_lm
    if p.optimizer == "adamw":
        # Decay the weight matrices and embeddings only: a decayed bias or gain only shrinks.
        weights = [w for w in model.parameters() if w.dim() >= 2]
        others = [w for w in model.parameters() if w.dim() < 2]
        return torch.optim.AdamW([{"params": weights, "weight_decay": p.weight_decay},
                                  {"params": others, "weight_decay": 0.0}], lr=p.lr,
                                 betas=(0.9, p.beta2))
    if p.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=p.lr, betas=(0.9, p.beta2))
    return torch.optim.SGD(model.parameters(), lr=p.lr)        # the chapter's


def train(name: str, corpus: np.ndarray, vocab: Vocab, params: Params, *,
          checkpoint_dir: Path | str | None = None, on_epoch: EpochCallback | None = None,
          overlap: bool | None = None, threads: Callable[[], int] | None = None,
          on_progress: ProgressCallback | None = None) -> TrainResult:
    """Train model `name` on the training split of `corpus`, validating every round (an epoch,
    or train_lm.eval_every steps) by the protocol, for the budget (train_lm.epochs, or
    max_steps) or until train_lm.patience rounds bring no better validation perplexity; resume
    from checkpoint_dir when it holds a checkpoint of the same run.
    `on_epoch(x, metrics)` sees every round of the history (x: its epoch, or step), restored
    ones included, in order; `on_progress(step, train_perplexity)` the steps between two
    evaluations, every PROGRESS_EVERY steps (by steps only).
    `overlap`: validate each epoch on a thread of its own while the next one trains (the same
    numbers); None: where that is possible and pays (validation_can_overlap). On the CPU beside a
    longer training, it runs in a thread of lower priority (seqlm.threads.yields_cores).
    `threads()`: the CPU threads the training may use from the next round on (a training left
    alone gets the cores the finished ones gave back; it then validates in place); None:
    train_lm.cpu_threads throughout. The numbers do not depend on it (tests/test_train.py)."""
    args = (name, corpus, vocab, params, checkpoint_dir, on_epoch, overlap, threads, on_progress)
    if resolve_device(params.train_lm.device).type == "cpu" and yields_cores(name, params):
        return in_background(_train, *args)
    return _train(*args)


class Cursor(NamedTuple):
    """By steps: where the next batch comes from, and the hidden state carried into it."""
    epoch: int                          # its epoch (1-based): the loader's seed
    batch: int                          # its index among that epoch's batches
    state: models.State | None          # None: a fresh state (an epoch's first batch)


def _train(name: str, corpus: np.ndarray, vocab: Vocab, params: Params,
           checkpoint_dir: Path | str | None, on_epoch: EpochCallback | None,
           overlap: bool | None, threads: Callable[[], int] | None,
           on_progress: ProgressCallback | None) -> TrainResult:
    p = params.train_lm
    unit = p.unit
    check_model_name(name)
    device = resolve_device(p.device)
    if device.type == "cuda":
        # TF32 tensor cores for the float32 products of the layers and the head.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    use_cpu_threads(params)
    split = split_of(corpus, params)
    _check_train_split(split.train_end, params)
    if int(corpus.max()) >= len(vocab):
        raise TrainingError(f"corpus holds token id {int(corpus.max())} but the vocabulary has "
                            f"{len(vocab)} tokens: the corpus and vocabulary files do not match")

    config = run_config(name, params, vocab, device, corpus, split)
    model = model_of(config, torch.Generator().manual_seed(params.seed)).to(device)
    dropout_rng = _dropout_generator(model, device, params.seed)
    optimizer = build_optimizer(model, params)
    # The compiled module shares the parameters; validation runs the eager model (other shapes).
    step_model = _compiled(model, device) if config["compiled"] else model
    history: list[dict[str, float]] = []
    best_state: dict[str, torch.Tensor] = {}
    cursor = Cursor(1, 0, None)

    ckpt_path = checkpoint_file(checkpoint_dir, config) if checkpoint_dir is not None else None
    ckpt = _restorable(ckpt_path, device, name)
    if ckpt is not None and ckpt["epoch"] > p.budget:
        # A shorter run of the same configuration cannot start from a longer one's end; it
        # trains afresh and leaves that checkpoint as it is, for the longer run to come back to.
        log.warning("%s: checkpoint is at %s %d, past train_lm.%s = %d; training %s afresh "
                    "without checkpoints (that one is kept)", ckpt_path, unit, ckpt["epoch"],
                    "epochs" if unit == "epoch" else "max_steps", p.budget, name)
        ckpt, ckpt_path = None, None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if dropout_rng is not None:
            dropout_rng.set_state(ckpt["dropout_rng"].cpu())
        history, best_state = ckpt["history"], ckpt["best_state"]
        if ckpt.get("cursor") is not None:
            epoch, batch, state = ckpt["cursor"]
            cursor = Cursor(epoch, batch, tuple(state) if state is not None else None)
        log.info("%s: resuming %s from %s %d", ckpt_path, name, unit, ckpt["epoch"])
    resumed_from = len(history)
    if on_epoch is not None:
        for row in history:
            on_epoch(int(row[unit]), _metrics(row, unit))

    train_t = torch.as_tensor(corpus[:split.train_end], dtype=torch.long, device=device)
    val_t = torch.as_tensor(protocol.validation_text(corpus, split), dtype=torch.long,
                            device=device)                 # both on the device once
    first = split.val_start - split.context_start
    # Asked for or not, only where the next round does not depend on this one's validation.
    overlap = validation_can_overlap(params, device) and (
        overlap if overlap is not None else p.cpu_threads < cores())
    validator = EpochValidator(name, config, params, val_t, first) if overlap else None
    pending: deque[Future] = deque()     # validations of the last rounds, running meanwhile
    stopped = patience_exhausted(history, p.patience)
    done = saved = int(history[-1][unit]) if history else 0      # epochs, or steps, trained

    def finish(row: dict[str, float], weights: dict[str, torch.Tensor] | None) -> None:
        """The bookkeeping of a validated round: history, best weights, callback, checkpoint."""
        nonlocal best_state, stopped, saved
        _check_finite(name, row, unit, p.lr)
        history.append(row)
        if best_row(history) is row:
            best_state = weights if weights is not None else snapshot(model)
        stopped = patience_exhausted(history, p.patience)
        if on_epoch is not None:
            on_epoch(int(row[unit]), _metrics(row, unit))
        best = best_row(history)
        line = (f"{name} {unit} {int(row[unit])}: train ppl {row['train_perplexity']:.3f}, val ppl "
                f"{row['val_perplexity']:.3f} (best {best['val_perplexity']:.3f} at {unit} "
                f"{int(best[unit])}), {row['tokens_per_s']:.0f} tokens/s")
        if ckpt_path is not None and checkpoint_due(row[unit], p, stopped):
            # The model is the product and a checkpoint a convenience: one that cannot be
            # written (a full disk) is a warning, and training goes on to publish the model.
            try:
                save_checkpoint(ckpt_path, model, optimizer, dropout_rng, int(row[unit]),
                                history, best_state, config,
                                cursor if unit == "step" else None)
            except OSError as exc:
                log.warning("%s %s %d: checkpoint not written (%s); training goes on, and a "
                            "run stopped now resumes from %s %d", name, unit, int(row[unit]),
                            exc, unit, saved)
                return
            saved = int(row[unit])
            log.info("%s; checkpoint %s", line, ckpt_path)
        elif unit == "step":          # an evaluation is minutes apart: each one is a line
            log.info("%s", line)

    def train_round() -> dict[str, float]:
        """Train the next epoch, or the next eval_every steps; the round's history row without
        its validation perplexity."""
        nonlocal done, cursor
        if unit == "epoch":
            epoch = done + 1
            rng = np.random.default_rng([params.seed, epoch])  # a resumed run sees the same batches
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(history, p.lr, p.lr_decay)
            loss, tokens = _train_epoch(step_model, optimizer, train_t, rng, p.sampling,
                                        p.batch_size, p.num_steps, p.clip_theta)
            done = epoch
            return {"epoch": epoch, "train_perplexity": _exp(loss), "val_perplexity": math.nan,
                    "tokens": tokens}
        steps = min(p.eval_every, p.budget - done)
        decay = learning_rate(history, 1.0, p.lr_decay)
        loss, tokens, cursor = _train_steps(
            step_model, optimizer, train_t, cursor, done, steps, params,
            lambda step: scheduled_lr(step, p) * decay, on_progress)
        done += steps
        passes = done * p.batch_size * p.num_steps / split.train_end
        return {"step": done, "epoch": round(passes, 3), "train_perplexity": _exp(loss),
                "val_perplexity": math.nan, "tokens": tokens}

    try:
        while done < p.budget and not stopped:
            start = time.perf_counter()
            every_core = follow_threads(threads)
            try:
                row = train_round()
            except interrupt.Interrupted:
                # The weights are part-way through this round: the last checkpoint resumes.
                kept = f"; checkpoint at {unit} {saved} kept" if saved and ckpt_path else ""
                raise interrupt.Interrupted(f"{name}: interrupted in {unit} {done + 1}{kept}; "
                                            "run again to resume") from None
            train_s = time.perf_counter() - start   # the loss.item() above waited for the device
            row["tokens_per_s"] = row.pop("tokens") / train_s
            # Checkpoints save the live model and optimizer: their rounds are validated here,
            # after the ones before them; so is every round of a training with every core.
            here = validator is None or every_core or checkpoint_due(done, p, stopped)
            while pending and (here or pending[0].done() or len(pending) >= VALIDATIONS_AHEAD):
                finish(*pending.popleft().result())
            if here:
                row["val_perplexity"] = perplexity(model, val_t, first, device)
                row["seconds"] = time.perf_counter() - start
                finish(row, None)
            else:
                row["seconds"] = time.perf_counter() - start
                pending.append(validator.submit(row, snapshot(model)))
        while pending:
            finish(*pending.popleft().result())
    finally:
        if validator is not None:
            validator.close()
    best, last = best_row(history), history[-1]
    rounds = "epochs" if unit == "epoch" else "evaluations"
    this_run = len(history) - resumed_from
    log.info("%s: %d %ss (%s this run) in %.1f s; best val ppl %.3f at %s %d; final %s: "
             "train ppl %.3f, val ppl %.3f", name, int(last[unit]), unit,
             this_run if unit == "epoch" else f"{this_run} evaluations",
             sum(row["seconds"] for row in history[resumed_from:]), best["val_perplexity"],
             unit, int(best[unit]), unit, last["train_perplexity"], last["val_perplexity"])
    if stopped:
        log.info("%s: stopped early at %s %d, %d %s after the best (val ppl %.3f at %s %d; "
                 "train_lm.patience = %d)", name, unit, int(last[unit]),
                 len(history) - 1 - history.index(best), rounds, best["val_perplexity"], unit,
                 int(best[unit]), p.patience)
    return TrainResult(model, best_state, config, history, device, resumed_from, stopped,
                       protocol.validation_digest(corpus, split, vocab.idx_to_token))


def validation_can_overlap(params: Params, device: torch.device) -> bool:
    """Whether an epoch's validation can run while the next epoch trains: on the CPU (a GPU
    would run both on one stream) and when the next epoch does not depend on it (no
    learning-rate decay, no early stopping). It pays where a core is left for it
    (train_lm.cpu_threads < cores), the default of train()."""
    p = params.train_lm
    return device.type == "cpu" and p.lr_decay == 1 and not p.patience


def model_of(config: dict, generator: torch.Generator | None = None) -> nn.Module:
    """The model a run_config() describes, initialised from `generator` (weights that are
    loaded next need none)."""
    return build_model(config["model"], config["vocab_size"], config["hidden"],
                       config["num_layers"], config["dropout"], generator or torch.Generator(),
                       config.get("embedding"))


def follow_threads(threads: Callable[[], int] | None) -> bool:
    """Set torch's CPU threads in this thread to what `threads()` grants now (None: leave them
    as they are); returns whether the grant is every core."""
    if threads is None:
        return False
    granted = threads()
    if granted != torch.get_num_threads():
        torch.set_num_threads(granted)
    return granted >= cores()


def checkpoint_due(done: float, p: TrainLmParams, stopped: bool) -> bool:
    """Whether the round that ends at `done` epochs (or steps) is checkpointed: every
    checkpoint_every-th round, the last one, and one that stops early."""
    rounds = done if p.unit == "epoch" else -(-int(done) // p.eval_every)
    return rounds % p.checkpoint_every == 0 or done == p.budget or stopped


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's weights on the CPU."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class EpochValidator:
    """Validation perplexities of snapshots of a model, on a thread of its own: on the CPU, one
    epoch's validation (a third of the scratch RNN's epoch) runs on another core while the next
    epoch trains. Its own copy of the model reads the snapshot; the numbers are those of the
    training thread (the same weights, code and thread count)."""

    def __init__(self, name: str, config: dict, params: Params, text: torch.Tensor,
                 first: int) -> None:
        self.model = model_of(config)
        self.params, self.text, self.first = params, text, first
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"validate-{name}",
                                       initializer=lower_priority)

    def submit(self, row: dict[str, float], weights: dict[str, torch.Tensor]) -> Future:
        """A future of (row with its val_perplexity, weights)."""
        return self.pool.submit(self._validate, row, weights)

    def _validate(self, row: dict[str, float], weights: dict[str, torch.Tensor],
                  ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        use_cpu_threads(self.params)
        self.model.load_state_dict(weights)
        row["val_perplexity"] = perplexity(self.model, self.text, self.first, "cpu")
        return row, weights

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _check_finite(name: str, row: dict[str, float], unit: str, lr: float) -> None:
    """A diverged run stops at once: nothing of it is saved, checkpointed or registered."""
    if not (math.isfinite(row["train_perplexity"]) and math.isfinite(row["val_perplexity"])):
        raise TrainingError(
            f"{name}: training diverged at {unit} {int(row[unit])} (train perplexity "
            f"{row['train_perplexity']}, validation perplexity {row['val_perplexity']}); "
            f"lower train_lm.lr (now {lr})")


def _compiled(model: nn.Module, device: torch.device) -> nn.Module:
    """torch.compile of the model for the training step: on CUDA with CUDA graphs, so that a
    step of the scratch cell's Python loop is replayed as one graph instead of launching every
    kernel from Python."""
    return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else "default",
                         dynamic=False)


def _dropout_generator(model: nn.Module, device: torch.device, seed: int,
                       ) -> torch.Generator | None:
    """The generator a model with dropout draws its masks from, on the training device."""
    if not getattr(model, "dropout", 0):
        return None
    model.generator = torch.Generator(device=device).manual_seed(seed)
    return model.generator


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
        interrupt.check()                                         # Ctrl-C: stop within a batch
        state = _step(model, optimizer, parameters, X, Y, state, sampling, theta, loss_sum)
        tokens += Y.numel()
    return loss_sum.item() / tokens, tokens


def _train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, corpus: torch.Tensor,
                 cursor: Cursor, first_step: int, steps: int, params: Params,
                 lr_of: Callable[[int], float], on_progress: ProgressCallback | None,
                 ) -> tuple[float, int, Cursor]:
    """`steps` optimizer steps from `cursor` on, epoch after epoch (each one's batches drawn as
    _train_epoch draws them, from the seed and its number), step i at learning rate lr_of(i);
    returns their mean loss, their token count and where the next step begins. The loss is
    read from the device once per PROGRESS_EVERY steps, for on_progress, and at the end."""
    p = params.train_lm
    model.train()
    parameters = list(model.parameters())
    loss_sum = torch.zeros((), dtype=torch.float64, device=corpus.device)
    tokens, taken, (epoch, skip, state) = 0, 0, cursor
    while True:
        rng = np.random.default_rng([params.seed, epoch])
        batches = LOADERS[p.sampling](corpus, p.batch_size, p.num_steps, rng)
        for index, (X, Y) in enumerate(batches):
            if index < skip:           # taken by earlier steps (slices: nothing is copied)
                continue
            interrupt.check()                                     # Ctrl-C: stop within a batch
            step = first_step + taken
            for group in optimizer.param_groups:
                group["lr"] = lr_of(step)
            state = _step(model, optimizer, parameters, X, Y, state, p.sampling, p.clip_theta,
                          loss_sum)
            tokens, taken = tokens + Y.numel(), taken + 1
            if on_progress is not None and (step + 1) % PROGRESS_EVERY == 0:
                on_progress(step + 1, _exp(loss_sum.item() / tokens))
            if taken == steps:
                return loss_sum.item() / tokens, tokens, Cursor(epoch, index + 1,
                                                                detach_state(state))
        epoch, skip, state = epoch + 1, 0, None


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, parameters: list[nn.Parameter],
          X: torch.Tensor, Y: torch.Tensor, state: models.State | None, sampling: str,
          theta: float, loss_sum: torch.Tensor) -> models.State:
    """One optimizer step on the batch (X, Y) from `state` (None: a fresh one), clipped to the
    global norm theta; adds the batch's summed loss to loss_sum (on the device) and returns the
    state to carry into the next batch."""
    if state is None or sampling == "random":
        state = model.begin_state(X.shape[0], X.device)          # random: batches are not adjacent
    else:
        state = detach_state(state)                              # truncated BPTT
    logits, state = model(X, state)
    y = Y.T.reshape(-1)                                          # time-major, as the logits
    loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip_gradients(parameters, theta)
    optimizer.step()
    loss_sum += loss.detach() * y.numel()
    return state


def _check_train_split(n_tokens: int, params: Params) -> None:
    p = params.train_lm
    if BATCHES_PER_EPOCH[p.sampling](n_tokens, p.batch_size, p.num_steps) < 1:
        raise LoaderSizeError(
            f"train split ({n_tokens} tokens, preprocess.train_tokens) is too small for "
            f"train_lm.batch_size = {p.batch_size} x train_lm.num_steps = {p.num_steps}: "
            "an epoch would have no batch")


def run_config(name: str, params: Params, vocab: Vocab, device: torch.device,
               corpus: np.ndarray, split: protocol.Split) -> dict:
    """Everything the trajectory of a run depends on. `epochs`, `patience` and
    `checkpoint_every` are left out on purpose: they decide where a run stops, not what it
    computes, so a longer run resumes a shorter one (by steps, `max_steps` shapes the schedule:
    it is in). The data (train and validation text, the vocabulary) and the code of the model,
    loop, loaders and protocol are in."""
    p = params.train_lm
    data = np.asarray(corpus[:split.val_end], dtype=np.int64)
    return {
        "model": name, "vocab": vocab.fingerprint(), "vocab_size": len(vocab),
        "hidden": p.hidden_size(name), "num_layers": p.layers(name),
        "dropout": p.dropout_of(name), "seed": params.seed,
        "train_tokens": split.train_end, "val_tokens": split.scored,
        "sampling": p.sampling, "batch_size": p.batch_size, "num_steps": p.num_steps,
        "compiled": p.compiled(name, device.type),
        "optimizer": p.optimizer, "lr": p.lr, "lr_decay": p.lr_decay, "clip_theta": p.clip_theta,
        "weight_decay": p.weight_decay, "beta2": p.beta2, "embedding": p.embedding_of(name),
        **{key: getattr(p, key) for key in ("max_steps", "eval_every", "warmup_steps",
                                            "lr_schedule", "lr_min")},
        "device": device.type, "cpu_threads": p.cpu_threads if device.type == "cpu" else None,
        "data": hashlib.sha256(data.tobytes()).hexdigest()[:16],
        "code": {Path(f).name: file_digest(f)[:16]
                 for f in (models.__file__, loaders.__file__, protocol.__file__, __file__)},
    }


def checkpoint_file(checkpoint_dir: Path | str, config: dict) -> Path:
    """One checkpoint per configuration: a run of other data, vocabulary or settings starts
    afresh beside the others, which stay (and resume when their configuration comes back)."""
    return Path(checkpoint_dir) / f"{_hash(config)}.pt"


def _restorable(path: Path | None, device: torch.device, name: str) -> dict | None:
    """The checkpoint to resume from, if any. An unreadable one is set aside (renamed, kept)."""
    if path is None or not path.exists():
        return None
    try:
        ckpt = load_checkpoint(path, device)
    except CheckpointError as exc:
        aside = path.with_name(f"{path.name}.unreadable")
        path.replace(aside)
        log.warning("%s; set aside as %s, training %s afresh", exc, aside, name)
        return None
    return ckpt


# `epoch` is where the run stands: its epoch, or by steps its step; `cursor` (by steps) where
# its next batch comes from and the hidden state carried into it.
CHECKPOINT_KEYS = frozenset({"model", "optimizer", "dropout_rng", "epoch", "history",
                             "best_state", "config"})


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    dropout_rng: torch.Generator | None, epoch: int,
                    history: list[dict[str, float]], best_state: dict[str, torch.Tensor],
                    config: dict, cursor: Cursor | None = None) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "dropout_rng": dropout_rng.get_state() if dropout_rng is not None else None,
             "epoch": epoch, "history": history, "best_state": best_state, "config": config,
             "cursor": None if cursor is None else
             [cursor.epoch, cursor.batch, None if cursor.state is None else list(cursor.state)]}
    save_torch(path, state)


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """Read a checkpoint; CheckpointError naming the file when it is not one."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= ckpt.keys():
            raise ValueError("not a training checkpoint")
    except Exception as exc:  # torch.load fails in many ways (zip, pickle, EOF); all mean "corrupt"
        reason = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {reason})"
                              ) from None
    return ckpt


def _metrics(row: dict[str, float], unit: str) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != unit}


def _exp(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf     # math.exp overflows past ~709


def _hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


