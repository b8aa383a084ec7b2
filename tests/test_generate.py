"""Generation (d2l predict_ch8, plus seeded sampling) and loading a trained model folder."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from seqlm.generate import ModelLoadError, load_trained, predict
from seqlm.models import build_model
from seqlm.params import Params, load_params
from seqlm.text import Vocab, read_lines, tokenize
from seqlm.train import TrainResult, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_run() -> tuple[TrainResult, Vocab, Params]:
    tokens = tokenize(read_lines(REPO / "data" / "mirror" / "timemachine.txt"), "char")
    vocab = Vocab(tokens)
    corpus = np.asarray([vocab[t] for line in tokens for t in line], dtype=np.int32)
    data = load_params(REPO / "params.yaml").model_dump(mode="json")
    data["train_lm"].update(device="cpu", hidden=64, epochs=4)
    params = Params.model_validate(data)
    return train("gru", corpus, vocab, params), vocab, params


@pytest.fixture
def trained(trained_run) -> tuple[torch.nn.Module, Vocab]:
    result, vocab, _ = trained_run
    return result.model, vocab


def _d2l_predict(prefix: str, num_preds: int, model, vocab: Vocab) -> str:
    """predict_ch8 as in d2l: warm up one character at a time, then argmax one at a time."""
    state = model.begin_state(1, "cpu")
    outputs = [vocab[prefix[0]]]
    def last() -> torch.Tensor:
        return torch.tensor([outputs[-1]]).reshape(1, 1)
    with torch.no_grad():
        for y in prefix[1:]:
            _, state = model(last(), state)
            outputs.append(vocab[y])
        for _ in range(num_preds):
            y, state = model(last(), state)
            outputs.append(int(y.argmax(dim=1).reshape(1)))
    return "".join(vocab.idx_to_token[i] for i in outputs)


def test_greedy_is_d2l_predict_and_deterministic(trained) -> None:
    model, vocab = trained
    text = predict("time traveller", 50, model, vocab, "cpu")
    assert text.startswith("time traveller") and len(text) == len("time traveller") + 50
    assert text == predict("time traveller", 50, model, vocab, "cpu")
    assert text == _d2l_predict("time traveller", 50, model, vocab)
    assert predict("traveller", 0, model, vocab, "cpu") == "traveller"


def test_sampling_is_deterministic_under_a_seed(trained) -> None:
    model, vocab = trained
    sample = lambda seed: predict("time traveller", 60, model, vocab, "cpu",   # noqa: E731
                                  temperature=1.5, top_k=10, seed=seed)
    assert sample(0) == sample(0)
    assert len({sample(s) for s in range(4)}) > 1
    model.train()
    sample(0)
    assert model.training                                # predict restores the mode it found


def test_top_k_one_and_a_cold_temperature_are_greedy(trained) -> None:
    model, vocab = trained
    greedy = predict("the time", 40, model, vocab, "cpu")
    assert predict("the time", 40, model, vocab, "cpu", top_k=1, seed=3) == greedy
    assert predict("the time", 40, model, vocab, "cpu", temperature=2.0, top_k=1) == greedy
    assert predict("the time", 40, model, vocab, "cpu", temperature=1e-4, seed=3) == greedy
    assert predict("the time", 40, model, vocab, "cpu", top_k=np.float64(1.0)) == greedy


def test_top_k_samples_only_the_k_most_likely() -> None:
    """A model whose next-token distribution is fixed: logits 5 > 4 > 3 > 0 ... for tokens 1, 2, 3."""
    vocab = Vocab(list("abcdefgh"))
    model = build_model("rnn", len(vocab), 4)
    with torch.no_grad():
        model.linear.weight.zero_()
        model.linear.bias.zero_()
        model.linear.bias[1:4] = torch.tensor([5.0, 4.0, 3.0])
    for k, allowed in ((2, set("ab")), (3, set("abc"))):
        text = predict("a", 300, model, vocab, "cpu", top_k=k, temperature=3.0, seed=0)
        assert set(text[1:]) == allowed
    hot = predict("a", 300, model, vocab, "cpu", temperature=50.0, seed=0)
    assert len(set(hot[1:]) - set("abc")) > 0          # no top-k: every token can appear


def test_prefixes_are_normalised_as_the_corpus_was(trained) -> None:
    model, vocab = trained
    text = predict("Time #Traveller!", 10, model, vocab, "cpu", seed=1, temperature=0.8)
    assert text.startswith("time traveller ") and len(text) == len("time traveller ") + 10
    assert text == predict("time traveller ", 10, model, vocab, "cpu", seed=1, temperature=0.8)
    assert predict("Zebra!", 3, model, vocab, "cpu").startswith("zebra ")


def test_prefixes_the_vocabulary_cannot_read_are_refused() -> None:
    from seqlm.models import build_model
    vocab = Vocab(list("abc abc"))
    model = build_model("rnn", len(vocab), 4)
    with pytest.raises(ValueError, match="prefix 'cab dz' has characters the model's "
                                         "vocabulary lacks: 'dz'"):
        predict("cab dz", 5, model, vocab, "cpu")


def test_bad_generation_arguments(trained) -> None:
    model, vocab = trained
    for kwargs, message in (({"temperature": 0.0}, "temperature = 0.0"),
                            ({"top_k": 0}, "top_k = 0"), ({"top_k": 2.5}, "top_k = 2.5")):
        with pytest.raises(ValueError, match=message):
            predict("time", 5, model, vocab, "cpu", **kwargs)
    with pytest.raises(ValueError, match="prefix '' is empty"):
        predict("", 5, model, vocab, "cpu")


def test_load_trained_round_trip_and_broken_folders(trained_run, tmp_path: Path) -> None:
    from tasks.train_lm import write_model_dir
    result, vocab, params = trained_run
    out = tmp_path / "models" / "gru"
    write_model_dir(out, result, vocab, params)
    model, loaded_vocab, meta = load_trained(out)
    assert loaded_vocab.idx_to_token == vocab.idx_to_token and meta["model"] == "gru"
    assert not model.training
    X = torch.randint(0, len(vocab), (2, 9))
    result.model.eval()
    assert torch.equal(model(X, model.begin_state(2, "cpu"))[0],
                       result.model(X, result.model.begin_state(2, "cpu"))[0])

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "model.pt").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match=f"^{broken / 'model.pt'}: unreadable model file"):
        load_trained(broken)
    shutil.copy(out / "model.pt", broken / "model.pt")
    Vocab(list("xyz")).save(broken / "vocab.parquet")
    with pytest.raises(ModelLoadError, match="trained on another vocabulary"):
        load_trained(broken)
    (broken / "meta.json").unlink()
    with pytest.raises(ModelLoadError, match="not a trained model folder, missing .*meta.json"):
        load_trained(broken)


def test_generate_streams_is_bounded_and_says_what_ctrl_c_stopped(trained_run, tmp_path: Path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from tasks.train_lm import write_model_dir
    from seqlm.generate import MAX_CHARS
    result, vocab, params = trained_run
    write_model_dir(tmp_path / "models" / "gru", result, vocab, params)
    command = [sys.executable, "-m", "seqlm.cli", "generate", "time traveller", "--model", "gru"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    too_many = subprocess.run([*command, "--num-chars", "10000000"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
    assert too_many.returncode == 2 and too_many.stdout == ""
    assert too_many.stderr == (f"error: --num-chars = 10000000: at most {MAX_CHARS:,} "
                               "characters a call\n")

    # the text comes as it is generated: the first characters while the rest is being made
    streaming = subprocess.Popen([*command, "--num-chars", str(MAX_CHARS)], cwd=tmp_path,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 start_new_session=True)
    first = streaming.stdout.read(len("time traveller") + 20)
    assert first.startswith(b"time traveller") and streaming.poll() is None
    time.sleep(0.5)
    streaming.send_signal(signal.SIGINT)
    rest, errors = streaming.communicate(timeout=30)
    assert streaming.returncode == 130
    assert errors.decode().strip() == "interrupted: generation stopped"
    assert len(first + rest) < len("time traveller") + MAX_CHARS

    # the streamed text is predict's
    whole = subprocess.run([*command, "--num-chars", "30"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert whole.stdout == predict("time traveller", 30, result.model, vocab, "cpu") + "\n"
