"""The training loop: clipping, learning, validation, reproducibility, checkpoints, bad input."""
from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from seqlm.generate import load_trained, predict
from seqlm.loaders import LoaderSizeError
from seqlm.params import Params, TrainLmParams, load_params
from seqlm.text import Vocab, read_lines, tokenize
from seqlm.train import (CheckpointError, TrainingError, clip_gradients, perplexity, run_config,
                         train)

REPO = Path(__file__).resolve().parents[1]


def make_params(seed: int = 0, train_tokens: int = 10_000, val_tokens: int = 5_000,
                **train_lm: object) -> Params:
    """The shipped params.yaml with small, CPU-only overrides (validated like the real file)."""
    data = load_params(REPO / "params.yaml").model_dump(mode="json")
    data["seed"] = seed
    data["preprocess"].update(train_tokens=train_tokens, val_tokens=val_tokens)
    data["train_lm"].update({"device": "cpu", **train_lm})
    return Params.model_validate(data)


def char_corpus(text_path: Path = REPO / "data" / "mirror" / "timemachine.txt"):
    tokens = tokenize(read_lines(text_path), "char")
    vocab = Vocab(tokens)
    return np.asarray([vocab[t] for line in tokens for t in line], dtype=np.int32), vocab


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, Vocab]:
    return char_corpus()


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ"


# --- clipping -------------------------------------------------------------------------------

def test_clipping_bounds_the_global_norm() -> None:
    params = [torch.nn.Parameter(torch.zeros(s)) for s in ((3, 4), (5,), (2, 2, 2))]
    torch.manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape) * 10
    before = [p.grad.clone() for p in params]
    norm = torch.sqrt(sum((g ** 2).sum() for g in before))
    returned = clip_gradients(params, theta=1.0)
    torch.testing.assert_close(returned, norm)
    after = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    torch.testing.assert_close(after, torch.tensor(1.0))
    for p, g in zip(params, before):                      # one common scale: directions kept
        torch.testing.assert_close(p.grad, g * (1.0 / norm))
    # Each gradient alone is below theta = 5, but the global norm is not: all are scaled.
    for p in params:
        p.grad = torch.full(p.shape, 0.9)
    clip_gradients(params, theta=5.0)
    assert torch.sqrt(sum((p.grad ** 2).sum() for p in params)) <= 5.0 + 1e-5


def test_clipping_leaves_small_gradients_exactly_alone() -> None:
    params = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))]
    params[0].grad = torch.tensor([0.1, -0.2, 0.3, 0.0])
    params[1].grad = torch.zeros(3)
    before = [p.grad.clone() for p in params]
    clip_gradients(params, theta=1.0)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before))
    for p in params:                                       # an all-zero gradient stays zero
        p.grad = torch.zeros_like(p)
    clip_gradients(params, theta=1.0)
    assert all(not p.grad.any() for p in params)


# --- learning -------------------------------------------------------------------------------

def test_learns_a_periodic_sequence_and_predicts_the_next_token() -> None:
    """Labels are the inputs shifted by one: a tiny model then continues the period exactly.
    (Labels equal to the inputs, or shifted by two, would generate something else.)"""
    period = "abcabdeab"                   # after 'b' comes c, d or nothing: context is needed
    tokens = list(period * 400)
    vocab = Vocab(tokens)
    corpus = np.asarray(vocab[tokens], dtype=np.int32)
    params = make_params(train_tokens=2400, val_tokens=1000, hidden=32, epochs=15,
                         batch_size=8, num_steps=9)
    result = train("rnn", corpus, vocab, params)
    last = result.history[-1]
    assert last["train_perplexity"] < 1.05 and last["val_perplexity"] < 1.05
    assert result.history[0]["train_perplexity"] > 1.2
    assert predict("abcab", 13, result.model, vocab, "cpu") == (period * 3)[:18]


def test_validation_perplexity_beats_the_unigram_baseline(data) -> None:
    corpus, vocab = data
    params = make_params(hidden=128, epochs=25)
    history: list[tuple[int, dict[str, float]]] = []
    result = train("rnn", corpus, vocab, params, on_epoch=lambda e, m: history.append((e, m)))
    assert [e for e, _ in history] == list(range(1, 26))
    assert set(history[0][1]) == {"train_perplexity", "val_perplexity", "tokens_per_s"}
    assert all(m["tokens_per_s"] > 0 for _, m in history)
    train_ids, val_ids = corpus[:10_000], corpus[10_000:15_000]
    counts = np.bincount(train_ids, minlength=len(vocab)) + 1          # add-one
    probs = counts / counts.sum()
    unigram = math.exp(-np.log(probs[val_ids[1:]]).mean())
    val = result.history[-1]["val_perplexity"]
    assert val == perplexity(result.model, val_ids, "cpu", 32, 35)
    assert val < 0.75 * unigram, (val, unigram)
    assert result.history[-1]["train_perplexity"] < result.history[0]["train_perplexity"]


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size() -> None:
    from seqlm.models import build_model
    model = build_model("gru", 28, 8)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()                      # every logit 0: uniform over 28 tokens
    ids = np.random.default_rng(0).integers(0, 28, 1000)
    assert perplexity(model, ids, "cpu", batch_size=4, num_steps=10) == pytest.approx(28.0)
    assert model.training                  # evaluation restores the mode it found
    with pytest.raises(LoaderSizeError, match="1000 tokens"):
        perplexity(model, ids, "cpu", batch_size=100, num_steps=35)


def test_random_sampling_trains_too(data) -> None:
    corpus, vocab = data
    seq = train("rnn_scratch", corpus, vocab, make_params(hidden_scratch=32, epochs=2))
    rnd = train("rnn_scratch", corpus, vocab,
                make_params(hidden_scratch=32, epochs=2, sampling="random"))
    assert all(math.isfinite(r["val_perplexity"]) for r in rnd.history)
    assert rnd.history[-1]["train_perplexity"] != seq.history[-1]["train_perplexity"]


# --- reproducibility and checkpoints --------------------------------------------------------

def test_same_seed_gives_identical_weights(data) -> None:
    corpus, vocab = data
    a = train("rnn_scratch", corpus, vocab, make_params(hidden_scratch=48, epochs=3))
    b = train("rnn_scratch", corpus, vocab, make_params(hidden_scratch=48, epochs=3))
    c = train("rnn_scratch", corpus, vocab, make_params(seed=1, hidden_scratch=48, epochs=3))
    assert_same_weights(weights(a.model), weights(b.model))
    assert [r["val_perplexity"] for r in a.history] == [r["val_perplexity"] for r in b.history]
    assert not torch.equal(a.model.W_hh, c.model.W_hh)


def test_a_longer_run_resumes_the_checkpoint_of_a_shorter_one(data, tmp_path: Path) -> None:
    corpus, vocab = data
    ckpt = tmp_path / "ckpt"
    short = train("lstm", corpus, vocab, make_params(hidden=32, epochs=2, checkpoint_every=5),
                  checkpoint_dir=ckpt)
    assert torch.load(ckpt / "last.pt", weights_only=True)["epoch"] == 2   # the final epoch too
    seen: list[int] = []
    longer = train("lstm", corpus, vocab, make_params(hidden=32, epochs=4, checkpoint_every=5),
                   checkpoint_dir=ckpt, on_epoch=lambda e, m: seen.append(e))
    assert longer.resumed_from == 2 and seen == [1, 2, 3, 4]   # restored epochs are replayed
    assert longer.history[:2] == short.history
    fresh = train("lstm", corpus, vocab, make_params(hidden=32, epochs=4))
    assert_same_weights(weights(longer.model), weights(fresh.model))
    assert [r["val_perplexity"] for r in longer.history] == [r["val_perplexity"] for r in fresh.history]


def test_another_configuration_starts_afresh(data, tmp_path: Path, caplog) -> None:
    corpus, vocab = data
    train("rnn", corpus, vocab, make_params(hidden=16, epochs=2), checkpoint_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="seqlm.train"):
        other = train("rnn", corpus, vocab, make_params(hidden=16, epochs=2, lr=0.5),
                      checkpoint_dir=tmp_path)
    assert other.resumed_from == 0
    assert "another configuration" in caplog.text and "lr" in caplog.text
    fresh = train("rnn", corpus, vocab, make_params(hidden=16, epochs=2, lr=0.5))
    assert_same_weights(weights(other.model), weights(fresh.model))
    assert torch.load(tmp_path / "last.pt", weights_only=True)["config"]["lr"] == 0.5


def test_config_hash_covers_every_training_param(data) -> None:
    """A new train_lm key must be hashed into checkpoints, or listed here as not affecting the
    trajectory; otherwise a changed run could silently resume a stale checkpoint."""
    corpus, vocab = data
    not_hashed = {"models", "epochs", "checkpoint_every"}            # where a run stops, which runs
    resolved = {"device", "hidden", "hidden_scratch", "num_layers"}  # hashed as the values used
    config = run_config("rnn", make_params(), vocab, torch.device("cpu"), corpus[:100])
    assert set(TrainLmParams.model_fields) == not_hashed | resolved | (config.keys() &
                                                                      TrainLmParams.model_fields.keys())
    assert {"seed", "train_tokens", "val_tokens", "model", "vocab_size", "data", "code"} <= config.keys()


KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_train import char_corpus, make_params
from seqlm.train import train
corpus, vocab = char_corpus()
train("rnn_scratch", corpus, vocab, make_params(hidden_scratch=64, epochs={epochs},
      checkpoint_every=1), checkpoint_dir={ckpt!r})
"""


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_weights(data, tmp_path: Path) -> None:
    corpus, vocab = data
    epochs, ckpt = 12, tmp_path / "ckpt"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), epochs=epochs, ckpt=str(ckpt))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)
    killed_at = 0
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if (ckpt / "last.pt").exists():
                killed_at = torch.load(ckpt / "last.pt", weights_only=True)["epoch"]
                if killed_at >= 3:
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and killed_at < 3:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run was not killed mid-way"
    assert 3 <= killed_at < epochs
    params = make_params(hidden_scratch=64, epochs=epochs, checkpoint_every=1)
    resumed = train("rnn_scratch", corpus, vocab, params, checkpoint_dir=ckpt)
    assert resumed.resumed_from >= killed_at
    straight = train("rnn_scratch", corpus, vocab, params)
    assert_same_weights(weights(resumed.model), weights(straight.model))
    assert [r["val_perplexity"] for r in resumed.history] == \
        [r["val_perplexity"] for r in straight.history]


# --- bad input ------------------------------------------------------------------------------

def test_nan_loss_stops_naming_the_epoch(data, tmp_path: Path) -> None:
    corpus, vocab = data
    # Clipping bounds each step to lr: only an lr near float32's limit overflows the logits.
    with pytest.raises(TrainingError, match=r"^rnn: training loss is (nan|inf) at epoch 1 ") as exc:
        train("rnn", corpus, vocab, make_params(hidden=16, epochs=5, lr=1e38),
              checkpoint_dir=tmp_path)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "last.pt").exists()            # a diverged state is never saved


def test_corrupt_checkpoint_is_refused_naming_the_file(data, tmp_path: Path) -> None:
    corpus, vocab = data
    params = make_params(hidden=16, epochs=1)
    train("rnn", corpus, vocab, params, checkpoint_dir=tmp_path)
    path = tmp_path / "last.pt"
    good = path.read_bytes()
    for bad in (good[: len(good) // 2], b"not a checkpoint at all"):
        path.write_bytes(bad)
        with pytest.raises(CheckpointError, match=f"^{path}: unreadable checkpoint .*delete it") as exc:
            train("rnn", corpus, vocab, params, checkpoint_dir=tmp_path)
        assert "\n" not in str(exc.value)
    torch.save({"something": "else"}, path)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        train("rnn", corpus, vocab, params, checkpoint_dir=tmp_path)


def test_checkpoint_of_another_vocabulary_is_refused(data, tmp_path: Path) -> None:
    corpus, vocab = data
    params = make_params(hidden=16, epochs=1)
    train("rnn", corpus, vocab, params, checkpoint_dir=tmp_path)
    other = Vocab(tokenize(read_lines(REPO / "data" / "mirror" / "timemachine.txt"), "char"),
                  reserved_tokens=["<bos>"])
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'last.pt'}: .*another vocabulary"):
        train("rnn", corpus, other, params, checkpoint_dir=tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_an_error(data) -> None:
    corpus, vocab = data
    with pytest.raises(TrainingError, match="train_lm.device = 'cuda' but .* no CUDA GPU"):
        train("rnn", corpus, vocab, make_params(device="cuda", epochs=1))


def test_sizes_that_do_not_fit_are_errors_naming_the_split(data) -> None:
    corpus, vocab = data
    with pytest.raises(LoaderSizeError, match=r"^train split \(preprocess.train_tokens = 10000\)"):
        train("rnn", corpus, vocab, make_params(num_steps=400, epochs=1))
    with pytest.raises(LoaderSizeError, match=r"^val split \(preprocess.val_tokens = 500\)"):
        train("rnn", corpus, vocab, make_params(val_tokens=500, batch_size=32, epochs=1))
    with pytest.raises(TrainingError, match="preprocess.train_tokens \\+ preprocess.val_tokens = "
                                            "170000 \\+ 5000 exceeds the corpus of 170580 tokens"):
        train("rnn", corpus, vocab, make_params(train_tokens=170_000, epochs=1))
    with pytest.raises(ValueError, match="unknown model 'cnn'"):
        train("cnn", corpus, vocab, make_params(epochs=1))


# --- the stage task -------------------------------------------------------------------------

def test_train_lm_task_writes_a_self_contained_model_folder(workdir: Path, data) -> None:
    from tasks.train_lm import train_lm
    corpus, vocab = data
    (workdir / "data" / "processed").mkdir(parents=True)
    np.save(workdir / "data" / "processed" / "corpus_char.npy", corpus)
    vocab.save(workdir / "data" / "processed" / "vocab_char.parquet")
    params = make_params(hidden=32, epochs=3, checkpoint_every=2)
    written = train_lm.fn(params, "gru")
    out = workdir / "models" / "gru"
    assert sorted(p.name for p in written) == ["history.csv", "meta.json", "model.pt", "vocab.parquet"]
    assert all((workdir / p).is_file() for p in written)
    history = pd.read_csv(out / "history.csv")
    assert list(history.columns) == ["epoch", "train_perplexity", "val_perplexity", "tokens_per_s"]
    assert history["epoch"].tolist() == [1, 2, 3]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["model"] == "gru" and meta["device"] == "cpu" and meta["epochs"] == 3
    assert meta["final_val_perplexity"] == pytest.approx(history["val_perplexity"].iloc[-1])
    assert meta["final_train_perplexity"] == pytest.approx(history["train_perplexity"].iloc[-1])
    assert meta["tokens_per_s"] == pytest.approx(history["tokens_per_s"].mean())
    assert meta["params"]["train_lm"]["hidden"] == 32 and meta["torch"] == torch.__version__
    assert (workdir / "checkpoints" / "gru" / "last.pt").is_file()      # kept: the final state
    model, loaded_vocab, loaded_meta = load_trained(out)
    assert loaded_vocab.idx_to_token == vocab.idx_to_token and loaded_meta == meta
    val_ids = corpus[10_000:15_000]
    assert perplexity(model, val_ids, "cpu", 32, 35) == pytest.approx(meta["final_val_perplexity"],
                                                                      rel=1e-12)
    # Re-running (as DVC does after deleting the outs) resumes the final checkpoint: same model.
    before = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    train_lm.fn(params, "gru")
    assert json.loads((out / "meta.json").read_text())["resumed_from_epoch"] == 3
    assert_same_weights(before, torch.load(out / "model.pt", weights_only=True)["state_dict"])


def test_train_lm_task_without_preprocessed_data(workdir: Path) -> None:
    from tasks.train_lm import train_lm
    with pytest.raises(FileNotFoundError, match="data/processed/corpus_char.npy: not found"):
        train_lm.fn(make_params(epochs=1), "rnn")
    assert not (workdir / "models").exists()
