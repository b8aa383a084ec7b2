"""The training loop: clipping, learning, validation, reproducibility, checkpoints, bad input."""
from __future__ import annotations

import json
import logging
import math
import re
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
from seqlm.threads import training_slots, yields_cores
from seqlm.text import Vocab, read_lines, tokenize
from seqlm import protocol
from seqlm.train import (TrainingError, clip_gradients, perplexity, run_config,
                         validation_can_overlap,
                         split_of, token_nll, train)

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
    assert set(history[0][1]) == {"train_perplexity", "val_perplexity", "tokens_per_s", "seconds"}
    assert all(m["tokens_per_s"] > 0 for _, m in history)
    train_ids, val_ids = corpus[:10_000], corpus[10_000:15_000]
    counts = np.bincount(train_ids, minlength=len(vocab)) + 1          # add-one
    probs = counts / counts.sum()
    unigram = math.exp(-np.log(probs[val_ids]).mean())                 # every validation token
    val = result.history[-1]["val_perplexity"]
    context = corpus[10_000 - protocol.CONTEXT:15_000]
    assert val == perplexity(result.model, context, protocol.CONTEXT, "cpu")
    assert val < 0.75 * unigram, (val, unigram)
    assert result.history[-1]["train_perplexity"] < result.history[0]["train_perplexity"]


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size() -> None:
    from seqlm.models import build_model
    model = build_model("gru", 28, 8)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()                      # every logit 0: uniform over 28 tokens
    ids = np.random.default_rng(0).integers(0, 28, 1000)
    assert perplexity(model, ids, 10, "cpu") == pytest.approx(28.0)
    assert model.training                  # evaluation restores the mode it found
    with pytest.raises(ValueError, match="nothing to score: 1000 tokens with the first 1000"):
        perplexity(model, ids, 1000, "cpu")


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


def only_checkpoint(folder: Path) -> Path:
    [path] = folder.glob("*.pt")
    return path


@pytest.mark.parametrize("settings", [{}, dict(optimizer="adam", lr=0.01, dropout=0.3,
                                                num_layers=2, lr_decay=0.5)],
                         ids=["chapter", "adam-dropout-decay"])
def test_a_longer_run_resumes_the_checkpoint_of_a_shorter_one(data, tmp_path: Path,
                                                              settings: dict) -> None:
    corpus, vocab = data
    ckpt = tmp_path / "ckpt"
    short = train("lstm", corpus, vocab, make_params(hidden=32, epochs=2, checkpoint_every=5,
                                                     **settings), checkpoint_dir=ckpt)
    assert torch.load(only_checkpoint(ckpt), weights_only=True)["epoch"] == 2   # the final too
    seen: list[int] = []
    longer = train("lstm", corpus, vocab, make_params(hidden=32, epochs=4, checkpoint_every=5,
                                                      **settings),
                   checkpoint_dir=ckpt, on_epoch=lambda e, m: seen.append(e))
    assert longer.resumed_from == 2 and seen == [1, 2, 3, 4]   # restored epochs are replayed
    assert longer.history[:2] == short.history
    fresh = train("lstm", corpus, vocab, make_params(hidden=32, epochs=4, **settings))
    assert_same_weights(weights(longer.model), weights(fresh.model))
    assert_same_weights(longer.best_state, fresh.best_state)
    assert [r["val_perplexity"] for r in longer.history] == [r["val_perplexity"] for r in fresh.history]


def test_a_shorter_run_trains_afresh_and_keeps_the_longer_ones_checkpoint(
        data, tmp_path: Path, caplog) -> None:
    corpus, vocab = data
    train("rnn", corpus, vocab, make_params(hidden=16, epochs=4, checkpoint_every=2),
          checkpoint_dir=tmp_path)
    longer = only_checkpoint(tmp_path)
    kept = longer.read_bytes()
    with caplog.at_level(logging.WARNING, logger="seqlm"):
        short = train("rnn", corpus, vocab, make_params(hidden=16, epochs=2, checkpoint_every=2),
                      checkpoint_dir=tmp_path)
    assert "past train_lm.epochs = 2; training rnn afresh without checkpoints" in caplog.text
    assert short.resumed_from == 0 and len(short.history) == 2
    fresh = train("rnn", corpus, vocab, make_params(hidden=16, epochs=2))
    assert_same_weights(weights(short.model), weights(fresh.model))
    assert only_checkpoint(tmp_path) == longer and longer.read_bytes() == kept
    back = train("rnn", corpus, vocab, make_params(hidden=16, epochs=4, checkpoint_every=2),
                 checkpoint_dir=tmp_path)
    assert back.resumed_from == 4                               # nothing trained again


def test_another_configuration_starts_afresh_beside_the_first(data, tmp_path: Path) -> None:
    corpus, vocab = data
    first = train("rnn", corpus, vocab, make_params(hidden=16, epochs=2), checkpoint_dir=tmp_path)
    other = train("rnn", corpus, vocab, make_params(hidden=16, epochs=2, lr=0.5),
                  checkpoint_dir=tmp_path)
    assert other.resumed_from == 0
    fresh = train("rnn", corpus, vocab, make_params(hidden=16, epochs=2, lr=0.5))
    assert_same_weights(weights(other.model), weights(fresh.model))
    assert len(list(tmp_path.glob("*.pt"))) == 2                # the first one is kept ...
    again = train("rnn", corpus, vocab, make_params(hidden=16, epochs=2), checkpoint_dir=tmp_path)
    assert again.resumed_from == 2                              # ... and resumes when it returns
    assert_same_weights(weights(again.model), weights(first.model))


def test_other_data_or_vocabulary_trains_afresh_and_keeps_the_old_checkpoint(
        data, tmp_path: Path) -> None:
    corpus, vocab = data
    params = make_params(hidden=16, epochs=1)
    train("rnn", corpus, vocab, params, checkpoint_dir=tmp_path)
    old = only_checkpoint(tmp_path)
    # another vocabulary (other reserved tokens shift every id), as after a preprocess change
    tokens = tokenize(read_lines(REPO / "data" / "mirror" / "timemachine.txt"), "char")
    other = Vocab(tokens, reserved_tokens=["<bos>"])
    other_corpus = np.asarray([other[t] for line in tokens for t in line], dtype=np.int32)
    shifted = train("rnn", other_corpus, other, params, checkpoint_dir=tmp_path)
    # another corpus with the same vocabulary
    reversed_corpus = corpus[::-1].copy()
    mirrored = train("rnn", reversed_corpus, vocab, params, checkpoint_dir=tmp_path)
    assert shifted.resumed_from == mirrored.resumed_from == 0
    assert old.exists() and len(list(tmp_path.glob("*.pt"))) == 3
    fresh = train("rnn", reversed_corpus, vocab, params)
    assert_same_weights(weights(mirrored.model), weights(fresh.model))


def test_config_hash_covers_every_training_param(data) -> None:
    """A new train_lm key must be hashed into checkpoints, or listed here as not affecting the
    trajectory; otherwise a changed run could silently resume a stale checkpoint."""
    corpus, vocab = data
    not_hashed = {"models", "epochs", "checkpoint_every", "patience"}  # where a run stops
    resolved = {"device", "hidden", "hidden_scratch", "num_layers", "dropout",
                "compile", "embedding"}                               # the values used
    params = make_params()
    config = run_config("rnn", params, vocab, torch.device("cpu"), corpus,
                        split_of(corpus, params))
    assert set(TrainLmParams.model_fields) == not_hashed | resolved | (config.keys() &
                                                                      TrainLmParams.model_fields.keys())
    assert {"seed", "train_tokens", "val_tokens", "model", "vocab", "vocab_size", "data",
            "code", "dropout", "num_layers", "hidden"} <= config.keys()
    assert "protocol.py" in config["code"]


KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_train import char_corpus, make_params
from seqlm.train import train
corpus, vocab = char_corpus()
train("rnn_scratch", corpus, vocab, make_params(**{kwargs!r}), checkpoint_dir={ckpt!r})
"""


def kill_after_checkpoint(tmp_path: Path, ckpt: Path, at_least: int, kwargs: dict) -> int:
    """Run a training in a subprocess, SIGKILL it once its checkpoint reaches epoch
    `at_least`; return the checkpoint's epoch."""
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), kwargs=kwargs, ckpt=str(ckpt))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)
    killed_at = 0
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            for path in ckpt.glob("*.pt"):
                killed_at = torch.load(path, weights_only=True)["epoch"]
            if killed_at >= at_least:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and killed_at < at_least:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run was not killed mid-way"
    return killed_at


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_weights(data, tmp_path: Path) -> None:
    corpus, vocab = data
    kwargs = dict(hidden_scratch=64, epochs=12, checkpoint_every=1)
    killed_at = kill_after_checkpoint(tmp_path, tmp_path / "ckpt", 3, kwargs)
    assert 3 <= killed_at < 12
    params = make_params(**kwargs)
    resumed = train("rnn_scratch", corpus, vocab, params, checkpoint_dir=tmp_path / "ckpt")
    assert resumed.resumed_from >= killed_at
    straight = train("rnn_scratch", corpus, vocab, params)
    assert_same_weights(weights(resumed.model), weights(straight.model))
    assert_same_weights(resumed.best_state, straight.best_state)
    assert [r["val_perplexity"] for r in resumed.history] == \
        [r["val_perplexity"] for r in straight.history]


# --- best checkpoint and early stopping -----------------------------------------------------

def test_the_best_epoch_is_kept_and_early_stopping_ends_the_run(data) -> None:
    """The chapter's settings overfit 10,000 characters within a few dozen epochs: validation
    perplexity turns up while training perplexity keeps falling."""
    corpus, vocab = data
    params = make_params(hidden=64, epochs=80, patience=5, num_steps=16)
    result = train("rnn", corpus, vocab, params)
    best = result.best
    assert result.stopped_early and len(result.history) == best["epoch"] + 5 < 80
    assert best["val_perplexity"] == min(r["val_perplexity"] for r in result.history)
    assert result.history[-1]["val_perplexity"] > best["val_perplexity"]
    # the kept weights are the best epoch's: scored again they give its validation perplexity
    kept = build_like(result)
    kept.load_state_dict(result.best_state)
    split = split_of(corpus, params)
    first = split.val_start - split.context_start
    assert perplexity(kept, protocol.validation_text(corpus, split), first, "cpu") == \
        best["val_perplexity"]
    assert perplexity(result.model, protocol.validation_text(corpus, split), first, "cpu") == \
        result.history[-1]["val_perplexity"]
    # without patience the run goes on to train_lm.epochs, through the same epochs
    longer = train("rnn", corpus, vocab, make_params(hidden=64, epochs=len(result.history) + 3,
                                                     num_steps=16))
    assert not longer.stopped_early and len(longer.history) == len(result.history) + 3
    assert longer.history[:len(result.history)] == [
        {**r, "tokens_per_s": l["tokens_per_s"], "seconds": l["seconds"]}
        for r, l in zip(result.history, longer.history)]


def build_like(result) -> torch.nn.Module:
    from seqlm.models import build_model
    c = result.config
    return build_model(c["model"], c["vocab_size"], c["hidden"], c["num_layers"], c["dropout"])


@pytest.mark.slow
def test_a_killed_run_continues_the_patience_count_exactly(data, tmp_path: Path) -> None:
    corpus, vocab = data
    kwargs = dict(hidden_scratch=48, epochs=200, patience=4, num_steps=16, checkpoint_every=1)
    straight = train("rnn_scratch", corpus, vocab, make_params(**kwargs))
    assert straight.stopped_early
    stop = len(straight.history)
    killed_at = kill_after_checkpoint(tmp_path, tmp_path / "ckpt", stop - 2, kwargs)
    assert stop - 2 <= killed_at <= stop
    resumed = train("rnn_scratch", corpus, vocab, make_params(**kwargs),
                    checkpoint_dir=tmp_path / "ckpt")
    assert resumed.stopped_early and len(resumed.history) == stop
    assert_same_weights(resumed.best_state, straight.best_state)
    # a run that already stopped early stops again at once
    again = train("rnn_scratch", corpus, vocab, make_params(**kwargs),
                  checkpoint_dir=tmp_path / "ckpt")
    assert again.resumed_from == stop and len(again.history) == stop


# --- the evaluation protocol ----------------------------------------------------------------

@pytest.mark.parametrize("n_val,first", [(5000, 64), (17, 64), (31, 3), (1, 64), (100, 64)])
def test_windows_score_every_position_once_after_its_context(n_val: int, first: int) -> None:
    text = torch.arange(first + n_val) % 97
    X, Y, positions, mask = protocol.windows(text, first)
    scored = positions[mask]
    assert sorted(scored.tolist()) == list(range(first, first + n_val))
    assert torch.equal(Y[mask], text[scored])
    assert torch.equal(X[mask], text[scored - 1])
    # every row reads on from its own start: a scored position is never the row's first input
    rows_start = positions[:, 0] - 1
    warm = scored_min_context(positions, mask, rows_start)
    assert warm >= min(first, protocol.CONTEXT)


def scored_min_context(positions: torch.Tensor, mask: torch.Tensor, rows_start: torch.Tensor) -> int:
    """The least number of tokens a row had read before any position it scores."""
    return int((positions - rows_start[:, None])[mask].min())


def test_rnns_and_ngram_baselines_score_the_same_tokens(data) -> None:
    from seqlm.ngram_lm import KneserNeyLM, unigram_log_probs
    from seqlm.models import build_model
    corpus, vocab = data
    for train_tokens, val_tokens in ((10_000, 5_000), (None, 17_000), (40, 1_001)):
        params = make_params(train_tokens=train_tokens, val_tokens=val_tokens)
        split = split_of(corpus, params)
        text, first = protocol.validation_text(corpus, split), split.val_start - split.context_start
        model = build_model("gru", len(vocab), 8, generator=torch.Generator().manual_seed(0))
        nll = token_nll(model, text, first, "cpu")
        kn = KneserNeyLM().fit(corpus[:split.train_end], len(vocab), 3)
        kn_lp = kn.token_log_probs(text, first)
        uni_lp = unigram_log_probs(corpus[:split.train_end], text, len(vocab), first)
        assert len(nll) == len(kn_lp) == len(uni_lp) == split.scored == val_tokens
        assert math.exp(nll.mean()) == pytest.approx(perplexity(model, text, first, "cpu"),
                                                     rel=1e-6)
    # the full-corpus split validates on the last val_tokens characters
    assert split_of(corpus, make_params(train_tokens=None, val_tokens=17_000)).train_end == \
        len(corpus) - 17_000


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("lr", [1e38, 1e6])
def test_a_diverging_run_stops_naming_the_learning_rate(data, tmp_path: Path, lr: float) -> None:
    corpus, vocab = data
    with pytest.raises(TrainingError, match=r"^rnn: training diverged at epoch \d+ .*lower "
                                            rf"train_lm.lr \(now {re.escape(str(lr))}\)$") as exc:
        train("rnn", corpus, vocab, make_params(hidden=16, epochs=30, lr=lr),
              checkpoint_dir=tmp_path)
    assert "\n" not in str(exc.value)
    assert not list(tmp_path.glob("*.pt"))                 # a diverged state is never saved


def test_an_unreadable_checkpoint_is_set_aside(data, tmp_path: Path, caplog) -> None:
    corpus, vocab = data
    params = make_params(hidden=16, epochs=1)
    fresh = train("rnn", corpus, vocab, params, checkpoint_dir=tmp_path)
    path = only_checkpoint(tmp_path)
    good = path.read_bytes()
    for bad in (good[: len(good) // 2], b"not a checkpoint at all"):
        path.write_bytes(bad)
        with caplog.at_level(logging.WARNING, logger="seqlm.train"):
            again = train("rnn", corpus, vocab, params, checkpoint_dir=tmp_path)
        assert again.resumed_from == 0
        assert f"{path}: unreadable checkpoint" in caplog.text and "set aside" in caplog.text
        assert (tmp_path / f"{path.name}.unreadable").read_bytes() == bad
        assert_same_weights(weights(again.model), weights(fresh.model))
        caplog.clear()
    torch.save({"something": "else"}, path)
    with caplog.at_level(logging.WARNING, logger="seqlm.train"):
        train("rnn", corpus, vocab, params, checkpoint_dir=tmp_path)
    assert "not a training checkpoint" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_an_error(data) -> None:
    corpus, vocab = data
    with pytest.raises(TrainingError, match="train_lm.device = 'cuda' but .* no CUDA GPU"):
        train("rnn", corpus, vocab, make_params(device="cuda", epochs=1))


def test_sizes_that_do_not_fit_are_errors_naming_the_split(data) -> None:
    corpus, vocab = data
    with pytest.raises(LoaderSizeError, match=r"^train split \(10000 tokens, preprocess.train_tokens\)"):
        train("rnn", corpus, vocab, make_params(num_steps=400, epochs=1))
    with pytest.raises(TrainingError, match="preprocess.train_tokens \\+ preprocess.val_tokens = "
                                            "170000 \\+ 5000 exceeds the corpus of 170580 tokens"):
        train("rnn", corpus, vocab, make_params(train_tokens=170_000, epochs=1))
    with pytest.raises(TrainingError, match="preprocess.val_tokens = 170580 leaves no training"):
        train("rnn", corpus, vocab, make_params(train_tokens=None, val_tokens=170_580, epochs=1))
    with pytest.raises(ValueError, match="unknown model 'cnn'"):
        train("cnn", corpus, vocab, make_params(epochs=1))


# --- the stage task -------------------------------------------------------------------------

def test_train_lm_task_writes_a_self_contained_model_folder(workdir: Path, data) -> None:
    from tasks.train_lm import train_lm
    corpus, vocab = data
    (workdir / "data" / "processed").mkdir(parents=True)
    np.save(workdir / "data" / "processed" / "corpus_char.npy", corpus)
    vocab.save(workdir / "data" / "processed" / "vocab_char.parquet")
    vocab.save(workdir / "data" / "processed" / "vocab_word.parquet")   # read by the checks only
    params = make_params(hidden=32, epochs=3, checkpoint_every=2)
    record = train_lm.fn(params, "gru")
    out = workdir / "models" / "gru"
    written = sorted(out.iterdir())
    assert [p.name for p in written] == ["history.csv", "meta.json", "model.pt", "vocab.parquet"]
    assert record["stage"] == "train_lm[gru]" and record["tracked"] is True
    assert record["model_version"] == "1"          # registered in the store of the workspace
    history = pd.read_csv(out / "history.csv")
    # only what a re-run reproduces: no timings
    assert list(history.columns) == ["epoch", "train_perplexity", "val_perplexity"]
    assert history["epoch"].tolist() == [1, 2, 3]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["model"] == "gru" and meta["device"] == "cpu" and meta["epochs"] == 3
    assert not {"tokens_per_s", "wall_s", "resumed_from_epoch"} & meta.keys()
    assert meta["final_val_perplexity"] == pytest.approx(history["val_perplexity"].iloc[-1])
    assert meta["final_train_perplexity"] == pytest.approx(history["train_perplexity"].iloc[-1])
    best = history.loc[history["val_perplexity"].idxmin()]
    assert meta["best_epoch"] == best["epoch"]
    assert meta["best_val_perplexity"] == pytest.approx(best["val_perplexity"], rel=1e-15)
    assert len(meta["validation_digest"]) == 64 and meta["stopped_early"] is False
    assert meta["params"]["train_lm"]["hidden"] == 32 and meta["torch"] == torch.__version__
    assert len(list((workdir / "checkpoints" / "gru").glob("*.pt"))) == 1   # the final state
    model, loaded_vocab, loaded_meta = load_trained(out)
    assert loaded_vocab.idx_to_token == vocab.idx_to_token and loaded_meta == meta
    context = corpus[10_000 - protocol.CONTEXT:15_000]
    assert perplexity(model, context, protocol.CONTEXT, "cpu") == meta["best_val_perplexity"]
    # Re-running (as DVC does after deleting the outs) resumes the final checkpoint: the same
    # bytes in every file.
    before = {p.name: p.read_bytes() for p in written}
    for path in written:
        path.unlink()
    train_lm.fn(params, "gru")
    assert {p.name: p.read_bytes() for p in written} == before


def test_train_lm_task_without_preprocessed_data(workdir: Path) -> None:
    from tasks.train_lm import train_lm
    with pytest.raises(FileNotFoundError, match="data/processed/corpus_char.npy: not found"):
        train_lm.fn(make_params(epochs=1), "rnn")
    assert not (workdir / "models").exists()


def test_the_learning_rate_decays_after_epochs_without_improvement() -> None:
    from seqlm.train import learning_rate
    history = [{"val_perplexity": v} for v in (9.0, 8.0, 8.5, 7.0, 7.0, 7.5)]
    assert [learning_rate(history[:i], 1.0, 0.5) for i in range(7)] == \
        [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.125]
    assert learning_rate(history, 0.1, 1.0) == 0.1


@pytest.mark.slow
def test_a_compiled_training_step_gives_the_eager_perplexities(data) -> None:
    """The GPU fast path (torch.compile of the step) runs on the CPU too, to float tolerance.
    Few time steps per batch: the compiled graph unrolls the scratch cell's loop over them, and
    compiling it, not training, is what takes the time."""
    corpus, vocab = data
    small = dict(hidden_scratch=32, epochs=2, num_steps=6, train_tokens=4_000)
    eager = train("rnn_scratch", corpus, vocab, make_params(**small, compile="off"))
    compiled = train("rnn_scratch", corpus, vocab, make_params(**small, compile="on"))
    assert compiled.config["compiled"] and not eager.config["compiled"]
    for a, b in zip(eager.history, compiled.history):
        assert b["val_perplexity"] == pytest.approx(a["val_perplexity"], rel=1e-4)
        assert b["train_perplexity"] == pytest.approx(a["train_perplexity"], rel=1e-4)


@pytest.mark.parametrize("name", ["rnn_scratch", "rnn"])
def test_validation_beside_training_gives_the_same_history_weights_and_checkpoint(
        data, tmp_path: Path, name: str) -> None:
    """Validating epoch k on its own thread while epoch k + 1 trains changes nothing computed:
    the history, the kept (best) weights, the last weights and the checkpoint's contents."""
    corpus, vocab = data
    params = make_params(hidden_scratch=48, hidden=32, epochs=7, checkpoint_every=3)
    assert validation_can_overlap(params, torch.device("cpu"))
    assert not validation_can_overlap(make_params(patience=2), torch.device("cpu"))
    runs = [train(name, corpus, vocab, params, checkpoint_dir=tmp_path / str(overlap),
                  overlap=overlap) for overlap in (False, True)]
    columns = ("epoch", "train_perplexity", "val_perplexity")
    assert [[r[c] for c in columns] for r in runs[0].history] == \
        [[r[c] for c in columns] for r in runs[1].history]
    assert_same_weights(runs[0].best_state, runs[1].best_state)
    assert_same_weights(weights(runs[0].model), weights(runs[1].model))
    ckpts = [torch.load(only_checkpoint(tmp_path / str(o)), weights_only=True)
             for o in (False, True)]
    assert_same_weights(ckpts[0]["model"], ckpts[1]["model"])
    assert ckpts[0]["epoch"] == ckpts[1]["epoch"] == 7


def test_only_the_longest_of_trainings_side_by_side_keeps_its_priority() -> None:
    params = make_params(models=["rnn", "rnn_scratch"])
    expected = training_slots(params) > 1
    assert yields_cores("rnn", params) == expected
    assert not yields_cores("rnn_scratch", params)
    lstm = make_params(models=["rnn_scratch", "lstm"], hidden=512)
    assert yields_cores("rnn_scratch", lstm) == expected and not yields_cores("lstm", lstm)
    assert not yields_cores("rnn", make_params(models=["rnn"]))


def test_early_stopping_is_never_validated_ahead(data) -> None:
    """Asked to overlap with train_lm.patience set, training still stops at the epoch the
    patience runs out, as it does validated in order (the next epoch depends on the check)."""
    corpus, vocab = data
    params = make_params(hidden_scratch=48, epochs=40, lr=5.0, patience=2)
    runs = [train("rnn_scratch", corpus, vocab, params, overlap=o) for o in (False, True)]
    assert runs[0].stopped_early and len(runs[0].history) < 40
    assert [r["val_perplexity"] for r in runs[1].history] == \
        [r["val_perplexity"] for r in runs[0].history]


@pytest.mark.parametrize("name", ["rnn_scratch", "rnn"])
def test_the_numbers_do_not_depend_on_the_threads_a_training_is_granted(data, name: str) -> None:
    """A training left alone takes the cores of the ones that ended (seqlm.runtime.own_process),
    so when that happens must not matter: at the main job's sizes, one thread throughout and a
    grant changing every epoch (1, 2, 3 threads; every core validates in place) give the same
    history and weights, bit for bit."""
    corpus, vocab = data
    params = make_params(epochs=4)                   # hidden 512 and 256: the main job's shapes
    grants, used = iter([1, 2, 3, 2]), []

    def grant() -> int:
        used.append(torch.get_num_threads())         # what the epoch before trained with
        return next(grants)
    fixed = train(name, corpus, vocab, params, overlap=True)
    granted = train(name, corpus, vocab, params, overlap=True, threads=grant)
    assert used == [1, 1, 2, 3]                      # followed, in the training's thread
    columns = ("epoch", "train_perplexity", "val_perplexity")
    assert [[r[c] for c in columns] for r in granted.history] == \
        [[r[c] for c in columns] for r in fixed.history]
    assert_same_weights(granted.best_state, fixed.best_state)
    assert_same_weights(weights(granted.model), weights(fixed.model))
