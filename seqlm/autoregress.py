"""The autoregressive MLP on the sine series (D2L 8.1): data, model, training, predictions.

Randomness comes only from explicit torch.Generators (never the global RNG): stages may run in
parallel threads of one process, and a shared global RNG would make each run's draws depend on
the others' timing.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

OnEpoch = Callable[[int, dict[str, float]], None]


def sine_series(T: int, noise_std: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t = 1..T (int64) and x_t = sin(0.01 t) + N(0, noise_std²) (float32), as in the seed."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(1, T + 1, dtype=torch.int64)
    x = torch.sin(0.01 * t.to(torch.float32)) + torch.normal(0.0, noise_std, (T,), generator=generator)
    return t, x


def check_sizes(T: int, tau: int, n_train: int, k_steps: Sequence[int], source: str) -> None:
    """Every evaluation range must be non-empty; the tightest is the held-out k-step range.
    params.yaml is checked the same way at start-up; this guards a series file of another T."""
    need = n_train + tau + max(k_steps)
    if T < need:
        raise ValueError(
            f"{source} has T = {T} points (sine.T), too few for train_ar: need T >= "
            f"train_ar.n_train + train_ar.tau + max(train_ar.k_steps) = "
            f"{n_train} + {tau} + {max(k_steps)} = {need}")


def windows(x: torch.Tensor, tau: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i: features x[i : i + tau], label x[i + tau] (seed: T - tau rows)."""
    features = x.unfold(0, tau, 1)[: len(x) - tau].contiguous()
    return features, x[tau:].reshape(-1, 1)


def build_mlp(tau: int, hidden: int, generator: torch.Generator) -> nn.Sequential:
    """Linear(tau, hidden) → ReLU → Linear(hidden, 1): Xavier-uniform weights (seed
    init_weights), biases drawn as nn.Linear's default U(±1/sqrt(fan_in))."""
    # skip_init: building the layers must not draw from the global RNG (see module docstring).
    net = nn.Sequential(nn.utils.skip_init(nn.Linear, tau, hidden), nn.ReLU(),
                        nn.utils.skip_init(nn.Linear, hidden, 1))
    for layer in (net[0], net[2]):
        nn.init.xavier_uniform_(layer.weight, generator=generator)
        bound = 1 / math.sqrt(layer.in_features)
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return net


def train(net: nn.Module, features: torch.Tensor, labels: torch.Tensor, *, batch_size: int,
          lr: float, epochs: int, generator: torch.Generator,
          on_epoch: OnEpoch | None = None) -> list[float]:
    """The seed's `train`: Adam on the summed squared error of shuffled minibatches (the last
    one may be short, as with DataLoader(shuffle=True)). Returns the training MSE per epoch."""
    loss = nn.MSELoss(reduction="none")
    optimizer = torch.optim.Adam(net.parameters(), lr)
    history = []
    for epoch in range(1, epochs + 1):
        for batch in torch.randperm(len(features), generator=generator).split(batch_size):
            optimizer.zero_grad()
            loss(net(features[batch]), labels[batch]).sum().backward()
            optimizer.step()
        with torch.no_grad():    # d2l.evaluate_loss: mean squared error over the training set
            train_loss = loss(net(features), labels).mean().item()
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"train_ar: training loss is {train_loss} at epoch {epoch}")
        history.append(train_loss)
        if on_epoch is not None:
            on_epoch(epoch, {"train_loss": train_loss})
    return history


@torch.no_grad()
def multistep(net: nn.Module, x: torch.Tensor, tau: int, start: int) -> torch.Tensor:
    """x[:start] observed, then each value predicted from the previous tau predictions (seed
    multistep_preds). Entries before `start` are NaN: there is no prediction there."""
    preds = x.clone()
    for i in range(start, len(x)):
        preds[i] = net(preds[i - tau:i].reshape(1, -1)).item()
    preds[:start] = math.nan
    return preds


@torch.no_grad()
def kstep(net: nn.Module, x: torch.Tensor, tau: int, max_steps: int) -> torch.Tensor:
    """The seed's k-step matrix: row r starts from the observed x[r : r + tau] and column k - 1
    holds the k-step-ahead prediction of x[r + tau + k - 1], for k = 1..max_steps.
    Shape (T - tau - max_steps + 1, max_steps)."""
    rows = len(x) - tau - max_steps + 1
    columns = list(x.unfold(0, tau, 1)[:rows].T)
    for _ in range(max_steps):
        columns.append(net(torch.stack(columns[-tau:], dim=1)).reshape(-1))
    return torch.stack(columns[tau:], dim=1)


def kstep_heldout_mse(preds: torch.Tensor, x: torch.Tensor, tau: int, n_train: int,
                      k_steps: Sequence[int]) -> dict[int, float]:
    """MSE of the k-step predictions on the held-out rows r >= n_train, the same rows for every k.

    Training row r (r < n_train) reads x[r : r + tau] and learns label x[r + tau], so training saw
    labels up to index n_train + tau - 1. A held-out row starts at r >= n_train (its first inputs
    may be those last training labels), and every prediction it makes, x[r + tau + k - 1] for
    k >= 1, lies at index >= n_train + tau: never a training label. Using the same rows for all k
    keeps the errors comparable; check_sizes guarantees at least one such row."""
    rows = torch.arange(n_train, preds.shape[0])
    return {k: torch.mean((preds[rows, k - 1] - x[rows + tau + k - 1]) ** 2).item() for k in k_steps}
