"""Character language models of D2L 8.5 / 8.6: a hand-written RNN and torch's RNN, GRU and LSTM.

Imports torch and the model names (seqlm.params), so that a bare benchmark can use it.

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

from seqlm.params import check_model_name

State = tuple[torch.Tensor, ...]


class RNNScratch(nn.Module):
    """H_t = tanh(X_t W_xh + H_{t-1} W_hh + b_h), O_t = H_t W_hq + b_q, X_t one-hot; a Python loop
    over the time steps (D2L 8.5). Weights N(0, 0.01^2), biases zero."""

    def __init__(self, vocab_size: int, hidden: int, generator: torch.Generator | None = None,
                 ) -> None:
        super().__init__()
        self.vocab_size, self.hidden = vocab_size, hidden

        def normal(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=generator) * 0.01)
        self.W_xh = normal(vocab_size, hidden)
        self.W_hh = normal(hidden, hidden)
        self.b_h = nn.Parameter(torch.zeros(hidden))
        self.W_hq = normal(hidden, vocab_size)
        self.b_q = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, X: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        (H,) = state
        # one_hot(X) @ W_xh is row X of W_xh (every other term of the sum is an exact 0 * w = 0):
        # a gather gives bit-identical values without the one-hot tensor. The input term and b_h
        # do not depend on H, so they are computed for all steps before the loop; the output
        # layer does not feed the recurrence, so it is one product after it. The loop keeps only
        # H @ W_hh (fused with the add) and tanh: faster (bench/train_speed.py), the same math as
        # d2l's per-step formula up to float rounding of the sums' order.
        XW = F.embedding(X.T, self.W_xh) + self.b_h             # (steps, batch, hidden)
        if XW.is_cuda:      # torch.compile captures this loop in CUDA graphs (train.py)
            hs = []
            for xw in XW:
                H = torch.tanh(torch.addmm(xw, H, self.W_hh))
                hs.append(H)
            Hs = torch.stack(hs)
        else:
            Hs = TanhRecurrence.apply(XW, H, self.W_hh)
        logits = torch.addmm(self.b_q, Hs.reshape(-1, self.hidden), self.W_hq)
        return logits, (Hs[-1],)                                   # (steps * batch, vocab)

    def begin_state(self, batch_size: int, device: torch.device | str) -> State:
        return (torch.zeros(batch_size, self.hidden, device=device),)


class TanhRecurrence(torch.autograd.Function):
    """Hs[t] = tanh(XW[t] + Hs[t-1] @ W_hh) for every step t (Hs[-1] = H0), with backpropagation
    through time written out. Autograd would record ~6 nodes per step and compute W_hh's gradient
    as one (hidden x batch) @ (batch x hidden) product per step, a shape the CPU's GEMM runs at a
    fraction of its speed; here the sequential products stay per step, but W_hh's gradient is
    one product over all steps, and the forward builds no graph. The states are written into one
    buffer behind H0, so that the backward reads the previous states as a view, not a copy. Same
    math as the loop, up to the order of float sums."""

    @staticmethod
    def forward(ctx, XW: torch.Tensor, H0: torch.Tensor, W_hh: torch.Tensor) -> torch.Tensor:
        states = XW.new_empty((XW.shape[0] + 1, *XW.shape[1:]))    # H0, H_1, ..., H_steps
        states[0] = H0
        H = states.unbind(0)
        for t, xw in enumerate(XW.unbind(0)):
            torch.addmm(xw, H[t], W_hh, out=H[t + 1]).tanh_()
        ctx.save_for_backward(states, W_hh)
        return states[1:]

    @staticmethod
    def backward(ctx, dHs: torch.Tensor):
        states, W_hh = ctx.saved_tensors
        hidden = states.shape[-1]
        Hs = states[1:]
        dZ = (Hs * Hs).neg_().add_(1)     # tanh' = 1 - H^2, then the pre-activation grads
        W_hh_T, dZ_t, dHs_t = W_hh.T, dZ.unbind(0), dHs.unbind(0)
        grad = dHs_t[-1]                   # the gradient reaching H_t: its own plus from t + 1
        for t in range(len(dZ_t) - 1, 0, -1):
            dZ_t[t].mul_(grad)
            grad = torch.mm(dZ_t[t], W_hh_T).add_(dHs_t[t - 1])
        dZ_t[0].mul_(grad)
        dH0 = dZ_t[0] @ W_hh_T if ctx.needs_input_grad[1] else None
        dW_hh = states[:-1].reshape(-1, hidden).T @ dZ.reshape(-1, hidden)
        return dZ, dH0, dW_hh


class TorchRNN(nn.Module):
    """One-hot inputs (or an embedding of `embedding` dimensions) -> num_layers of nn.RNN /
    nn.GRU / nn.LSTM -> a Linear head (d2l RNNModel, D2L 8.6), with dropout on the outputs of
    every recurrent layer when training (the non-recurrent connections, Zaremba et al. 2014).
    An embedding gives a large alphabet (a raw text's hundreds of characters) a small input
    layer: each step reads one row of it instead of multiplying a one-hot vector.

    The layers are kept one per module so that dropout draws from the model's own `generator`
    (on the model's device; training sets and checkpoints it): randomness never comes from
    torch's global RNG, which trainings running side by side in one process would share. The
    state is (num_layers, batch, hidden), as torch's layers use it."""

    LAYERS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}

    def __init__(self, kind: str, vocab_size: int, hidden: int, num_layers: int,
                 dropout: float = 0.0, generator: torch.Generator | None = None,
                 embedding: int | None = None) -> None:
        super().__init__()
        self.vocab_size, self.hidden, self.num_layers = vocab_size, hidden, num_layers
        self.dropout = dropout
        self.generator: torch.Generator | None = None
        self.is_lstm = kind == "lstm"
        self.embedding = nn.Embedding(vocab_size, embedding) if embedding else None
        inputs = embedding or vocab_size
        self.layers = nn.ModuleList(self.LAYERS[kind](inputs if i == 0 else hidden, hidden)
                                    for i in range(num_layers))
        self.linear = nn.Linear(hidden, vocab_size)
        # torch's default initialisation, drawn from `generator`: U(-1/sqrt(h), 1/sqrt(h)) for
        # the recurrent weights and biases, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the head,
        # N(0, 1) for an embedding (drawn last: the others are those of a one-hot model).
        with torch.no_grad():
            for p in self.layers.parameters():
                p.uniform_(-hidden ** -0.5, hidden ** -0.5, generator=generator)
            for p in self.linear.parameters():
                p.uniform_(-hidden ** -0.5, hidden ** -0.5, generator=generator)
            if self.embedding is not None:
                self.embedding.weight.normal_(generator=generator)

    def forward(self, X: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if self.embedding is not None:
            Y = self.embedding(X.T)                                # (steps, batch, embedding)
        else:
            Y = F.one_hot(X.T, self.vocab_size).to(torch.float32)  # (steps, batch, vocab)
        new: list[State] = []
        for i, layer in enumerate(self.layers):
            own = tuple(s[i:i + 1] for s in state)
            Y, out = layer(Y, own if self.is_lstm else own[0])
            new.append(out if self.is_lstm else (out,))
            Y = self._drop(Y)
        logits = self.linear(Y.reshape(-1, self.hidden))
        return logits, tuple(torch.cat(parts) for parts in zip(*new))

    def _drop(self, Y: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropout == 0:
            return Y
        keep = torch.empty_like(Y).bernoulli_(1 - self.dropout, generator=self.generator)
        return Y * keep / (1 - self.dropout)

    def begin_state(self, batch_size: int, device: torch.device | str) -> State:
        shape = (self.num_layers, batch_size, self.hidden)
        count = 2 if self.is_lstm else 1                    # LSTM: (hidden, memory cell)
        return tuple(torch.zeros(shape, device=device) for _ in range(count))


def detach_state(state: State) -> State:
    """Cut the graph at a batch boundary (truncated BPTT), keeping the values."""
    return tuple(s.detach() for s in state)


def build_model(name: str, vocab_size: int, hidden: int, num_layers: int = 1,
                dropout: float = 0.0, generator: torch.Generator | None = None,
                embedding: int | None = None) -> nn.Module:
    """The model, initialised from `generator` (torch's global RNG when None)."""
    check_model_name(name)
    if vocab_size < 1 or hidden < 1 or num_layers < 1:
        raise ValueError(f"model {name}: vocab_size={vocab_size}, hidden={hidden} and "
                         f"num_layers={num_layers} must all be >= 1")
    if not 0 <= dropout < 1:
        raise ValueError(f"model {name}: dropout={dropout} must lie in [0, 1)")
    if name == "rnn_scratch":
        if num_layers != 1 or dropout or embedding:
            raise ValueError(f"model rnn_scratch has one layer, one-hot inputs and no dropout, "
                             f"got num_layers={num_layers}, dropout={dropout}, "
                             f"embedding={embedding}")
        return RNNScratch(vocab_size, hidden, generator)
    return TorchRNN(name, vocab_size, hidden, num_layers, dropout, generator, embedding)
