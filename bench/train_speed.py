"""Training throughput: the seed's train_ch8 loop vs this project's loop, side by side.

The baseline re-implements the chapter's code faithfully: a scratch cell that multiplies one-hot
inputs step by step, gradient clipping that reads the norm on the host (`if norm > theta`), and
loss bookkeeping with `float(l)` every step. Both loops train the same model shapes on the same
batches (sequential partitioning of the first 10,000 characters, batch 32, 35 steps), alternating
epochs so that drift in machine load hits both alike.

    python bench/train_speed.py --device cpu --epochs 6
    python bench/train_speed.py --whole-training --epochs 500   # d2l's train_ch8, end to end

--whole-training times the seed's train_ch8 as the chapter runs it, model after model: every
epoch with the seed loop and a 50-character prediction every 10 epochs (the animator aside),
on torch's default threads; it prints one JSON line of seconds per model (bench/main_job.py).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seqlm.loaders import seq_data_iter_sequential
from seqlm.models import build_model, detach_state
from seqlm.text import Vocab, read_lines, tokenize
from seqlm.train import _train_epoch

CORPUS = Path(__file__).resolve().parents[1] / "data" / "mirror" / "timemachine.txt"


class SeedScratchRNN(nn.Module):
    """d2l RNNModelScratch: X one-hot (steps, batch, V); H = tanh(X W_xh + H W_hh + b_h)."""

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        normal = lambda *shape: nn.Parameter(torch.randn(*shape) * 0.01)  # noqa: E731
        self.W_xh, self.W_hh = normal(vocab_size, hidden), normal(hidden, hidden)
        self.b_h = nn.Parameter(torch.zeros(hidden))
        self.W_hq, self.b_q = normal(hidden, vocab_size), nn.Parameter(torch.zeros(vocab_size))
        self.hidden = hidden

    def begin_state(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor]:
        return (torch.zeros(batch_size, self.hidden, device=device),)

    def forward(self, X: torch.Tensor, state: tuple[torch.Tensor]):
        inputs = F.one_hot(X.T, self.vocab_size).float()
        H, = state
        outputs = []
        for x in inputs:
            H = torch.tanh(x @ self.W_xh + H @ self.W_hh + self.b_h)
            outputs.append(H @ self.W_hq + self.b_q)
        return torch.cat(outputs, dim=0), (H,)


def seed_epoch(model, optimizer, corpus, rng, batch_size, num_steps, theta) -> tuple[float, int]:
    """d2l train_epoch_ch8 (sequential partitioning): two host syncs per step."""
    state, loss_sum, tokens = None, 0.0, 0
    params = [p for p in model.parameters() if p.requires_grad]
    for X, Y in seq_data_iter_sequential(corpus, batch_size, num_steps, rng):
        state = model.begin_state(X.shape[0], corpus.device) if state is None else detach_state(state)
        y_hat, state = model(X, state)
        y = Y.T.reshape(-1)
        loss = F.cross_entropy(y_hat, y.long()).mean()
        optimizer.zero_grad()
        loss.backward()
        norm = torch.sqrt(sum(torch.sum(p.grad ** 2) for p in params))
        if norm > theta:                                   # host sync 1
            for p in params:
                p.grad[:] *= theta / norm
        optimizer.step()
        loss_sum += float(loss.detach()) * y.numel()       # host sync 2
        tokens += y.numel()
    return loss_sum / tokens, tokens


def measure(name: str, device: torch.device, epochs: int, corpus: torch.Tensor, vocab_size: int):
    hidden = 512 if name == "rnn_scratch" else 256
    torch.manual_seed(0)
    seed_model = (SeedScratchRNN(vocab_size, hidden) if name == "rnn_scratch"
                  else build_model(name, vocab_size, hidden)).to(device)
    torch.manual_seed(0)
    ours = build_model(name, vocab_size, hidden).to(device)
    runs = {"seed": (seed_model, torch.optim.SGD(seed_model.parameters(), lr=1.0)),
            "ours": (ours, torch.optim.SGD(ours.parameters(), lr=1.0))}
    times = {"seed": [], "ours": []}
    tokens_per_epoch = 0
    for epoch in range(epochs + 1):                  # epoch 0 warms both up, not timed
        for label, (model, optimizer) in runs.items():
            rng = np.random.default_rng([0, epoch])
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            if label == "seed":
                loss, tokens = seed_epoch(model, optimizer, corpus, rng, 32, 35, 1.0)
            else:
                loss, tokens = _train_epoch(model, optimizer, corpus, rng, "sequential", 32, 35, 1.0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if epoch:
                times[label].append(time.perf_counter() - start)
            assert math.isfinite(loss)
            tokens_per_epoch = tokens
    rate = {k: tokens_per_epoch / float(np.median(v)) for k, v in times.items()}
    return rate["seed"], rate["ours"]


def seed_predict(prefix: str, num_preds: int, model: nn.Module, vocab: Vocab,
                 device: torch.device) -> str:
    """d2l predict_ch8: warm up on the prefix, then greedy characters one at a time."""
    state = model.begin_state(1, device)
    outputs = [vocab[prefix[0]]]
    with torch.no_grad():
        for y in prefix[1:]:
            _, state = model(torch.tensor([[outputs[-1]]], device=device), state)
            outputs.append(vocab[y])
        for _ in range(num_preds):
            y, state = model(torch.tensor([[outputs[-1]]], device=device), state)
            outputs.append(int(y.argmax(dim=1).reshape(1)))
    return "".join(vocab.to_tokens(outputs))


def whole_training_seconds(name: str, device: torch.device, epochs: int, corpus: torch.Tensor,
                           vocab: Vocab) -> float:
    """d2l train_ch8 of `name` from scratch for `epochs` epochs (lr 1, theta 1, batch 32 x 35
    steps, sequential partitioning), predicting every 10 epochs; its wall seconds."""
    hidden = 512 if name == "rnn_scratch" else 256
    torch.manual_seed(0)
    model = (SeedScratchRNN(len(vocab), hidden) if name == "rnn_scratch"
             else build_model(name, len(vocab), hidden)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    start = time.perf_counter()
    for epoch in range(epochs):
        loss, _ = seed_epoch(model, optimizer, corpus, np.random.default_rng([0, epoch]), 32, 35,
                             1.0)
        if (epoch + 1) % 10 == 0:
            seed_predict("time traveller", 50, model, vocab, device)
    assert math.isfinite(loss)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--models", nargs="+", default=["rnn_scratch", "rnn"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); the "
                        "pipeline gives each of its side-by-side trainings one core's worth")
    parser.add_argument("--whole-training", action="store_true",
                        help="time the seed's train_ch8 end to end for --epochs epochs per model")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tokens = tokenize(read_lines(CORPUS), "char")
    vocab = Vocab(tokens)
    ids = torch.tensor([vocab[t] for line in tokens for t in line][:10_000], device=device)
    if args.whole_training:
        print(json.dumps({model: whole_training_seconds(model, device, args.epochs, ids, vocab)
                          for model in args.models}))
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"median of {args.epochs} epochs each, epochs alternating")
    print(f"{'model':12s} {'seed loop tok/s':>16s} {'this loop tok/s':>16s} {'ratio':>7s}")
    for model in args.models:
        seed_rate, our_rate = measure(model, device, args.epochs, ids, len(vocab))
        print(f"{model:12s} {seed_rate:16,.0f} {our_rate:16,.0f} {our_rate / seed_rate:6.2f}x")


if __name__ == "__main__":
    main()
