"""Minibatches of subsequences from one long token sequence (D2L 8.3.4).

Both loaders take the corpus as a 1-D integer tensor (already on the training device, so that
batching never copies from the host) and a numpy Generator for offsets and shuffling, so that a
run seeded per epoch is reproducible and a resumed run sees the same batches.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:   # the batch counts (params and preflight checks) need no torch
    import torch

    Batch = tuple[torch.Tensor, torch.Tensor]


class LoaderSizeError(ValueError):
    """batch_size / num_steps do not fit the corpus: the epoch would be empty."""


def _check_sizes(n_tokens: int, batch_size: int, num_steps: int, batches: int) -> None:
    if batch_size < 1 or num_steps < 1:
        raise LoaderSizeError(f"batch_size={batch_size} and num_steps={num_steps} must be >= 1")
    if batches < 1:
        raise LoaderSizeError(
            f"batch_size={batch_size} x num_steps={num_steps} needs more than the "
            f"{n_tokens} tokens available: an epoch would have no batch")


def random_batches_per_epoch(n_tokens: int, batch_size: int, num_steps: int) -> int:
    """Batches that seq_data_iter_random yields for the worst offset (num_steps - 1)."""
    return max(n_tokens - num_steps, 0) // num_steps // batch_size


def sequential_batches_per_epoch(n_tokens: int, batch_size: int, num_steps: int) -> int:
    """Batches that seq_data_iter_sequential yields for the worst offset (num_steps - 1)."""
    return max(n_tokens - num_steps, 0) // batch_size // num_steps


def seq_data_iter_random(corpus: torch.Tensor, batch_size: int, num_steps: int,
                         rng: np.random.Generator) -> Iterator[Batch]:
    """Random sampling: disjoint subsequences from a random offset, in random order. Adjacent
    batches are not adjacent in the corpus, so the hidden state is reset per batch."""
    import torch
    n = len(corpus)
    _check_sizes(n, batch_size, num_steps, random_batches_per_epoch(n, batch_size, num_steps))
    offset = int(rng.integers(0, num_steps))              # 0 .. num_steps - 1
    num_subseqs = (n - offset - 1) // num_steps           # - 1: each label is one token ahead
    starts = offset + num_steps * rng.permutation(num_subseqs)
    steps = torch.arange(num_steps, device=corpus.device)
    for i in range(num_subseqs // batch_size):
        batch_starts = torch.as_tensor(starts[i * batch_size:(i + 1) * batch_size],
                                       device=corpus.device)
        index = batch_starts[:, None] + steps
        yield corpus[index], corpus[index + 1]


def seq_data_iter_sequential(corpus: torch.Tensor, batch_size: int, num_steps: int,
                             rng: np.random.Generator) -> Iterator[Batch]:
    """Sequential partitioning: row i of batch t+1 continues row i of batch t in the corpus, so
    the hidden state can be carried across batches (truncated BPTT).

    The seed draws the offset from [0, num_steps], one past the range it means; here it is
    [0, num_steps - 1]."""
    n = len(corpus)
    _check_sizes(n, batch_size, num_steps, sequential_batches_per_epoch(n, batch_size, num_steps))
    offset = int(rng.integers(0, num_steps))
    num_tokens = (n - offset - 1) // batch_size * batch_size
    xs = corpus[offset:offset + num_tokens].reshape(batch_size, -1)
    ys = corpus[offset + 1:offset + 1 + num_tokens].reshape(batch_size, -1)
    for i in range(xs.shape[1] // num_steps):
        yield xs[:, i * num_steps:(i + 1) * num_steps], ys[:, i * num_steps:(i + 1) * num_steps]


LOADERS = {"random": seq_data_iter_random, "sequential": seq_data_iter_sequential}
BATCHES_PER_EPOCH = {"random": random_batches_per_epoch, "sequential": sequential_batches_per_epoch}
