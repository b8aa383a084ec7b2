"""Character language models of D2L 8.5 / 8.6: a hand-written RNN and torch's RNN, GRU and LSTM.

Imports only torch, so that a bare benchmark can use it.

Interface shared by every model (as d2l's RNNModelScratch / RNNModel):
- `forward(X, state)`: X is a LongTensor (batch, steps) of token ids; returns logits of shape
  (steps * batch, vocab) in d2l's TIME-MAJOR order (row t * batch + b is step t of sequence b,
  so the matching labels are `Y.T.reshape(-1)`) and the new state.
- `begin_state(batch_size, device)`: the zero state, always a tuple of tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

State = tuple[torch.Tensor, ...]
MODEL_NAMES: tuple[str, ...] = ("rnn_scratch", "rnn", "gru", "lstm")


class RNNScratch(nn.Module):
    """H_t = tanh(X_t W_xh + H_{t-1} W_hh + b_h), O_t = H_t W_hq + b_q, X_t one-hot; a Python loop
    over the time steps (D2L 8.5). Weights N(0, 0.01^2), biases zero."""

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.vocab_size, self.hidden = vocab_size, hidden
        self.W_xh = nn.Parameter(torch.randn(vocab_size, hidden) * 0.01)
        self.W_hh = nn.Parameter(torch.randn(hidden, hidden) * 0.01)
        self.b_h = nn.Parameter(torch.zeros(hidden))
        self.W_hq = nn.Parameter(torch.randn(hidden, vocab_size) * 0.01)
        self.b_q = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, X: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        (H,) = state
        # one_hot(X) @ W_xh is row X of W_xh (every other term of the sum is an exact 0 * w = 0):
        # a gather gives bit-identical values without the one-hot tensor. The input term and b_h
        # do not depend on H, so they are computed for all steps before the loop; the output
        # layer does not feed the recurrence, so it is one product after it. The loop keeps only
        # H @ W_hh (fused with the add) and tanh: ~18% faster on 2 CPU cores at hidden 512, same
        # math as d2l's per-step formula up to float rounding of the sums' order.
        XW = F.embedding(X.T, self.W_xh) + self.b_h             # (steps, batch, hidden)
        hs = []
        for xw in XW:
            H = torch.tanh(torch.addmm(xw, H, self.W_hh))
            hs.append(H)
        logits = torch.addmm(self.b_q, torch.cat(hs), self.W_hq)   # (steps * batch, vocab)
        return logits, (H,)

    def begin_state(self, batch_size: int, device: torch.device | str) -> State:
        return (torch.zeros(batch_size, self.hidden, device=device),)


class TorchRNN(nn.Module):
    """One-hot inputs -> nn.RNN / nn.GRU / nn.LSTM -> a Linear head (d2l RNNModel, D2L 8.6)."""

    LAYERS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}

    def __init__(self, kind: str, vocab_size: int, hidden: int, num_layers: int) -> None:
        super().__init__()
        self.vocab_size, self.hidden, self.num_layers = vocab_size, hidden, num_layers
        self.is_lstm = kind == "lstm"
        self.rnn = self.LAYERS[kind](vocab_size, hidden, num_layers)
        self.linear = nn.Linear(hidden, vocab_size)

    def forward(self, X: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        inputs = F.one_hot(X.T, self.vocab_size).to(torch.float32)   # (steps, batch, vocab)
        Y, new = self.rnn(inputs, state if self.is_lstm else state[0])
        return self.linear(Y.reshape(-1, self.hidden)), new if self.is_lstm else (new,)

    def begin_state(self, batch_size: int, device: torch.device | str) -> State:
        shape = (self.num_layers, batch_size, self.hidden)
        count = 2 if self.is_lstm else 1                    # LSTM: (hidden, memory cell)
        return tuple(torch.zeros(shape, device=device) for _ in range(count))


def detach_state(state: State) -> State:
    """Cut the graph at a batch boundary (truncated BPTT), keeping the values."""
    return tuple(s.detach() for s in state)


def check_model_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODEL_NAMES)}")


def build_model(name: str, vocab_size: int, hidden: int, num_layers: int = 1) -> nn.Module:
    check_model_name(name)
    if vocab_size < 1 or hidden < 1 or num_layers < 1:
        raise ValueError(f"model {name}: vocab_size={vocab_size}, hidden={hidden} and "
                         f"num_layers={num_layers} must all be >= 1")
    if name == "rnn_scratch":
        if num_layers != 1:
            raise ValueError(f"model rnn_scratch has one layer, got num_layers={num_layers}")
        return RNNScratch(vocab_size, hidden)
    return TorchRNN(name, vocab_size, hidden, num_layers)
