"""The four language models: interface, d2l semantics of the scratch cell, initialisation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqlm.models import RNNScratch, build_model, detach_state
from seqlm.params import GATES, MODEL_NAMES

V, BATCH, STEPS = 28, 3, 7


def test_the_params_know_every_model_and_its_gates() -> None:
    # params.yaml is validated against the model names; the memory check and the choice of which
    # training keeps its core weigh models by GATES
    assert MODEL_NAMES == tuple(GATES)
    for name, gates in GATES.items():
        W_hh = next(w for key, w in build_model(name, V, hidden=16).named_parameters()
                    if key in ("W_hh", "layers.0.weight_hh_l0"))
        assert W_hh.shape == (16 * gates, 16), name


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("layers", [1, 2])
def test_interface_and_shapes(name: str, layers: int) -> None:
    if name == "rnn_scratch" and layers == 2:
        pytest.skip("the scratch RNN has one layer")
    torch.manual_seed(0)
    model = build_model(name, V, hidden=16, num_layers=layers)
    state = model.begin_state(BATCH, "cpu")
    assert isinstance(state, tuple) and len(state) == (2 if name == "lstm" else 1)
    assert all(not s.any() for s in state)
    X = torch.randint(0, V, (BATCH, STEPS))
    logits, new_state = model(X, state)
    assert logits.shape == (STEPS * BATCH, V)
    assert [s.shape for s in new_state] == [s.shape for s in state]
    # Carrying the state on changes the next output; a fresh state reproduces the first.
    again, _ = model(X, new_state)
    assert not torch.allclose(again, logits)
    assert torch.equal(model(X, model.begin_state(BATCH, "cpu"))[0], logits)
    assert all(not s.requires_grad for s in detach_state(new_state))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_logits_are_time_major_and_causal(name: str) -> None:
    """Row t * batch + b is step t of sequence b and depends on X[b, :t+1] only."""
    torch.manual_seed(0)
    model = build_model(name, V, hidden=16, num_layers=1)
    X = torch.randint(0, V, (BATCH, STEPS))
    X2 = X.clone()
    X2[1, 3] = (X[1, 3] + 1) % V
    a = model(X, model.begin_state(BATCH, "cpu"))[0].reshape(STEPS, BATCH, V)
    b = model(X2, model.begin_state(BATCH, "cpu"))[0].reshape(STEPS, BATCH, V)
    assert torch.equal(a[:, [0, 2]], b[:, [0, 2]])      # other sequences untouched
    assert torch.equal(a[:3, 1], b[:3, 1])              # earlier steps untouched
    assert not torch.allclose(a[3:, 1], b[3:, 1])       # the changed step and later ones move


def _d2l_rnn(model: RNNScratch, X: torch.Tensor, state: tuple[torch.Tensor]):
    """d2l 8.5 verbatim in spirit: one-hot inputs, one matmul per term, output per step, cat."""
    (H,) = state
    outputs = []
    for x in F.one_hot(X.T, model.vocab_size).type(torch.float32):
        H = torch.tanh(torch.mm(x, model.W_xh) + torch.mm(H, model.W_hh) + model.b_h)
        outputs.append(torch.mm(H, model.W_hq) + model.b_q)
    return torch.cat(outputs, dim=0), (H,)


def test_scratch_equals_the_one_hot_formulation() -> None:
    torch.manual_seed(0)
    model = RNNScratch(V, 32)
    with torch.no_grad():                       # non-trivial weights, so every term matters
        for p in model.parameters():
            p.normal_(0, 0.1)
    X = torch.randint(0, V, (BATCH, STEPS))
    state = (torch.randn(BATCH, 32),)
    # The gather is exactly the one-hot product ...
    one_hot = F.one_hot(X.T, V).type(torch.float32)
    assert torch.equal(F.embedding(X.T, model.W_xh), torch.stack([x @ model.W_xh for x in one_hot]))
    # ... and the whole model is d2l's formula up to the rounding of reordered sums.
    ours, (h_ours,) = model(X, state)
    ref, (h_ref,) = _d2l_rnn(model, X, state)
    torch.testing.assert_close(ours, ref)                     # float32: rtol 1.3e-6, atol 1e-5
    torch.testing.assert_close(h_ours, h_ref)
    grads = []
    for out in (ours, ref):
        model.zero_grad()
        (out.square().sum()).backward(retain_graph=True)
        grads.append([p.grad.clone() for p in model.parameters()])
    for g_ours, g_ref in zip(*grads):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-5)


def test_scratch_initialisation() -> None:
    torch.manual_seed(0)
    model = build_model("rnn_scratch", V, hidden=512)
    assert model.W_xh.shape == (V, 512) and model.W_hh.shape == (512, 512)
    assert model.W_hq.shape == (512, V)
    for w in (model.W_xh, model.W_hh, model.W_hq):
        assert abs(w.std().item() - 0.01) < 0.0005
        assert abs(w.mean().item()) < 0.0005
    assert not model.b_h.any() and not model.b_q.any()
    assert model.b_h.shape == (512,) and model.b_q.shape == (V,)


def test_torch_models_use_the_requested_layer() -> None:
    for name, cls in (("rnn", torch.nn.RNN), ("gru", torch.nn.GRU), ("lstm", torch.nn.LSTM)):
        model = build_model(name, V, hidden=24, num_layers=3)
        assert [type(layer) for layer in model.layers] == [cls] * 3
        assert [(layer.input_size, layer.hidden_size, layer.num_layers)
                for layer in model.layers] == [(V, 24, 1), (24, 24, 1), (24, 24, 1)]
        assert model.linear.out_features == V


def test_bad_model_arguments() -> None:
    with pytest.raises(ValueError, match="unknown model 'transformer': expected one of "
                                         "rnn_scratch, rnn, gru, lstm") as exc:
        build_model("transformer", V, 16)
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="one layer"):
        build_model("rnn_scratch", V, 16, num_layers=2)
    with pytest.raises(ValueError, match="no dropout"):
        build_model("rnn_scratch", V, 16, dropout=0.5)
    with pytest.raises(ValueError, match=r"dropout=1 must lie in \[0, 1\)"):
        build_model("gru", V, 16, dropout=1)
    with pytest.raises(ValueError, match="hidden=0"):
        build_model("gru", V, 0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_initialisation_comes_from_the_generator_not_the_global_rng(name: str) -> None:
    def built(global_seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(global_seed)
        return build_model(name, V, 16, generator=torch.Generator().manual_seed(7)).state_dict()
    a, b = built(0), built(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = build_model(name, V, 16, generator=torch.Generator().manual_seed(8)).state_dict()
    assert not all(torch.equal(a[k], other[k]) for k in a)


def test_torch_layers_init_like_torch_defaults() -> None:
    model = build_model("lstm", V, hidden=400, generator=torch.Generator().manual_seed(0))
    bound = 400 ** -0.5
    for p in [*model.layers.parameters(), *model.linear.parameters()]:
        assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound   # U(-1/sqrt(h), 1/sqrt(h))


def test_dropout_only_when_training_and_reproducible_from_the_model_generator() -> None:
    model = build_model("gru", V, 16, num_layers=2, dropout=0.5,
                        generator=torch.Generator().manual_seed(0))
    X = torch.randint(0, V, (BATCH, STEPS))

    def forward(seed: int) -> torch.Tensor:
        model.generator = torch.Generator().manual_seed(seed)
        return model(X, model.begin_state(BATCH, "cpu"))[0]
    assert torch.equal(forward(1), forward(1))
    assert not torch.equal(forward(1), forward(2))
    model.eval()
    assert torch.equal(forward(1), forward(2))                      # no dropout at evaluation
    plain = build_model("gru", V, 16, num_layers=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(forward(1), plain.eval()(X, plain.begin_state(BATCH, "cpu"))[0])
