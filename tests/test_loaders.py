"""Properties of the two minibatch loaders (D2L 8.3.4), with the seed's offset defect fixed."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from seqlm.loaders import (LoaderSizeError, random_batches_per_epoch, seq_data_iter_random,
                           seq_data_iter_sequential, sequential_batches_per_epoch)

sizes = st.tuples(st.integers(1, 6), st.integers(1, 9), st.integers(0, 400), st.integers(0, 2**32 - 1))


def _fits(n, batch_size, num_steps, counter):
    return counter(n, batch_size, num_steps) >= 1


@settings(max_examples=150, deadline=None)
@given(sizes)
def test_random_sampling(args):
    batch_size, num_steps, n, seed = args
    corpus = torch.arange(n)
    rng = np.random.default_rng(seed)
    if not _fits(n, batch_size, num_steps, random_batches_per_epoch):
        with pytest.raises(LoaderSizeError, match=f"batch_size={batch_size} x num_steps={num_steps}"):
            list(seq_data_iter_random(corpus, batch_size, num_steps, rng))
        return
    batches = list(seq_data_iter_random(corpus, batch_size, num_steps, rng))
    assert len(batches) >= random_batches_per_epoch(n, batch_size, num_steps)
    starts = []
    for X, Y in batches:
        assert X.shape == Y.shape == (batch_size, num_steps)
        assert torch.equal(Y, X + 1)                                  # labels shifted by one
        assert torch.equal(X, X[:, :1] + torch.arange(num_steps))     # contiguous rows
        starts += X[:, 0].tolist()
    offset = min(starts) % num_steps
    assert 0 <= offset <= num_steps - 1
    assert all(s % num_steps == offset for s in starts)               # one offset per epoch
    assert len(set(starts)) == len(starts)                            # disjoint subsequences
    assert max(starts) + num_steps <= n - 1                           # labels stay in range
    # coverage: every subsequence that fits a full batch set is drawn at most once, and the
    # epoch uses all but fewer than batch_size of them
    available = (n - offset - 1) // num_steps
    assert available - len(starts) < batch_size


@settings(max_examples=150, deadline=None)
@given(sizes)
def test_sequential_partitioning(args):
    batch_size, num_steps, n, seed = args
    corpus = torch.arange(n)
    rng = np.random.default_rng(seed)
    if not _fits(n, batch_size, num_steps, sequential_batches_per_epoch):
        with pytest.raises(LoaderSizeError):
            list(seq_data_iter_sequential(corpus, batch_size, num_steps, rng))
        return
    batches = list(seq_data_iter_sequential(corpus, batch_size, num_steps, rng))
    assert len(batches) >= sequential_batches_per_epoch(n, batch_size, num_steps)
    offset = int(batches[0][0][0, 0])
    assert 0 <= offset <= num_steps - 1                               # the seed allowed num_steps
    for (X, _), (X_next, _) in zip(batches, batches[1:]):
        assert torch.equal(X_next[:, 0], X[:, -1] + 1)                # rows continue across batches
    for X, Y in batches:
        assert X.shape == Y.shape == (batch_size, num_steps)
        assert torch.equal(Y, X + 1)
        assert int(Y.max()) <= n - 1
    # coverage: the batches tile each row without gaps, leaving less than num_steps per row
    row_len = (n - offset - 1) // batch_size
    assert row_len - len(batches) * num_steps < num_steps


def test_offset_covers_the_whole_fixed_range():
    corpus = torch.arange(200)
    rng = np.random.default_rng(0)
    offsets = {int(next(seq_data_iter_sequential(corpus, 2, 5, rng))[0][0, 0]) for _ in range(300)}
    assert offsets == {0, 1, 2, 3, 4}


def test_seed_example_sequential_layout():
    # The seed's printed example (offset 4): rows continue each other across batches.
    batches = []
    for seed in range(100):
        first = next(seq_data_iter_sequential(torch.arange(35), 2, 5, np.random.default_rng(seed)))
        if int(first[0][0, 0]) == 4:
            batches = list(seq_data_iter_sequential(torch.arange(35), 2, 5, np.random.default_rng(seed)))
            break
    assert [X.tolist() for X, _ in batches] == [
        [[4, 5, 6, 7, 8], [19, 20, 21, 22, 23]],
        [[9, 10, 11, 12, 13], [24, 25, 26, 27, 28]],
        [[14, 15, 16, 17, 18], [29, 30, 31, 32, 33]]]


def test_too_large_sizes_name_the_problem():
    with pytest.raises(LoaderSizeError, match="batch_size=32 x num_steps=35 needs more than the 1000 tokens"):
        list(seq_data_iter_sequential(torch.arange(1000), 32, 35, np.random.default_rng(0)))
