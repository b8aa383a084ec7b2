"""Training by steps (train_lm.max_steps): the schedule, the rounds of eval_every steps, patience
and checkpoints counted in evaluations, and a killed run resuming to the same weights."""
from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seqlm.params import ParamsError, load_params
from seqlm.train import TrainingError, patience_exhausted, scheduled_lr, train

from test_train import assert_same_weights, char_corpus, make_params, weights

# A small LSTM with everything a long run uses: an embedding, AdamW with weight decay, dropout
# (its mask generator is part of the state), warm-up and a cosine schedule, state carried
# across batches (and across evaluations) by sequential sampling.
STEPS = dict(models=["lstm"], hidden=32, embedding=8, batch_size=8, num_steps=16,
             optimizer="adamw", weight_decay=0.1, lr=0.01, dropout=0.1, max_steps=60,
             eval_every=20, warmup_steps=5, lr_schedule="cosine", lr_min=0.001,
             checkpoint_every=1)


@pytest.fixture(scope="module")
def data():
    return char_corpus()


def test_the_schedule_warms_up_then_follows_a_cosine_to_its_floor() -> None:
    p = make_params(**STEPS).train_lm
    lrs = [scheduled_lr(step, p) for step in range(p.max_steps)]
    assert lrs[:5] == pytest.approx([0.002, 0.004, 0.006, 0.008, 0.01])
    assert lrs[5] == pytest.approx(0.01)                          # the top, then down
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    assert scheduled_lr(p.max_steps, p) == pytest.approx(p.lr_min)
    even = make_params(**{**STEPS, "max_steps": 105}).train_lm     # 100 steps after warm-up
    assert scheduled_lr(55, even) == pytest.approx((p.lr + p.lr_min) / 2)
    constant = make_params(max_steps=60, eval_every=20).train_lm
    assert {scheduled_lr(step, constant) for step in range(60)} == {constant.lr}


def test_rounds_are_evaluations_with_the_step_as_their_x(data) -> None:
    corpus, vocab = data
    rounds, progress = [], []
    result = train("lstm", corpus, vocab, make_params(**STEPS),
                   on_epoch=lambda step, metrics: rounds.append((step, metrics)),
                   on_progress=lambda step, ppl: progress.append((step, ppl)))
    assert [row["step"] for row in result.history] == [20, 40, 60]
    assert [step for step, _ in rounds] == [20, 40, 60]
    # passes over the 10,000 training characters: 8 x 16 tokens a step
    assert [row["epoch"] for row in result.history] == [0.256, 0.512, 0.768]
    assert [step for step, _ in progress] == [10, 20, 30, 40, 50, 60]
    assert all(math.isfinite(ppl) and ppl > 1 for _, ppl in progress)
    assert result.history[-1]["val_perplexity"] < result.history[0]["val_perplexity"]
    # the model reads an embedding, and AdamW decays its matrices but not its biases
    assert result.model.embedding.weight.shape == (len(vocab), 8)


def test_the_last_round_is_shorter_when_eval_every_does_not_divide_max_steps(data) -> None:
    corpus, vocab = data
    result = train("lstm", corpus, vocab, make_params(**{**STEPS, "max_steps": 50}))
    assert [row["step"] for row in result.history] == [20, 40, 50]


def test_patience_counts_evaluations() -> None:
    rows = [{"step": s, "val_perplexity": v} for s, v in
            [(100, 5.0), (200, 4.0), (300, 4.5), (400, 4.2)]]
    assert not patience_exhausted(rows[:3], 2)
    assert patience_exhausted(rows, 2)            # two evaluations after the best, at step 200
    assert not patience_exhausted(rows, 3)


KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_train import char_corpus, make_params
from seqlm.train import train
corpus, vocab = char_corpus()
train("lstm", corpus, vocab, make_params(**{kwargs!r}), checkpoint_dir={ckpt!r})
"""


@pytest.mark.slow
def test_a_killed_run_resumes_mid_epoch_to_the_same_weights(data, tmp_path: Path) -> None:
    """Killed after an evaluation in the middle of an epoch (the hidden state carried into the
    next batch, the dropout generator, AdamW's moments and the schedule's step are in the
    checkpoint), it ends with the weights and the validation curve of a run never killed."""
    corpus, vocab = data
    kwargs = {**STEPS, "max_steps": 400, "eval_every": 30}
    ckpt = tmp_path / "ckpt"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), kwargs=kwargs, ckpt=str(ckpt))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)
    killed_at = 0
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and killed_at < 90:
            for path in ckpt.glob("*.pt"):
                killed_at = torch.load(path, weights_only=True)["epoch"]
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and 90 <= killed_at < 400, killed_at
    params = make_params(**kwargs)
    resumed = train("lstm", corpus, vocab, params, checkpoint_dir=ckpt)
    assert resumed.resumed_from == killed_at // 30
    straight = train("lstm", corpus, vocab, params)
    assert_same_weights(weights(resumed.model), weights(straight.model))
    assert_same_weights(resumed.best_state, straight.best_state)
    assert [r["val_perplexity"] for r in resumed.history] == \
        [r["val_perplexity"] for r in straight.history]


def test_a_diverging_run_by_steps_names_the_step(data) -> None:
    corpus, vocab = data
    with pytest.raises(TrainingError, match=r"^lstm: training diverged at step 20 .*"
                                            r"lower train_lm\.lr"):
        train("lstm", corpus, vocab, make_params(**{**STEPS, "lr": 1e30, "optimizer": "sgd",
                                                    "weight_decay": 0.0, "clip_theta": 1e30}))


@pytest.mark.parametrize("train_lm, message", [
    ({"max_steps": 100, "warmup_steps": 100},
     "train_lm.warmup_steps = 100 must be below train_lm.max_steps = 100"),
    ({"max_steps": 100, "eval_every": 200},
     "train_lm.eval_every = 200 exceeds train_lm.max_steps = 100"),
    ({"lr_schedule": "cosine"}, "train_lm.lr_schedule applies to training by steps"),
    ({"warmup_steps": 10}, "train_lm.warmup_steps applies to training by steps"),
    ({"optimizer": "adam", "weight_decay": 0.1},
     "train_lm.weight_decay = 0.1 applies to the adamw optimizer only"),
    ({"max_steps": 100, "eval_every": 50, "lr_schedule": "cosine", "lr": 0.001, "lr_min": 0.01},
     "train_lm.lr_min = 0.01 exceeds train_lm.lr = 0.001"),
    ({"embedding": 0}, "train_lm.embedding = 0: Input should be greater than 0"),
])
def test_a_schedule_that_cannot_fit_is_one_line_naming_the_keys(tmp_path: Path, train_lm: dict,
                                                                message: str) -> None:
    import yaml
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    params["train_lm"].update(train_lm)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert str(error.value).startswith(f"{path}: {message}")
    assert "\n" not in str(error.value)


def test_a_training_alone_computes_on_every_core() -> None:
    from seqlm.threads import cores
    from tasks.train_lm import trainer
    alone = trainer(make_params(**STEPS))
    assert alone.keywords["threads"]() == cores()
    side_by_side = trainer(make_params(models=["rnn", "gru"]))
    assert getattr(side_by_side, "keywords", {}).get("threads") is None


def test_the_bar_moves_between_evaluations(monkeypatch) -> None:
    import io
    from tasks.train_lm import progress_bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress_bar("lstm", 600, "step") as (report, progress):
        progress(10, 30.0)
        time.sleep(0.2)                              # tqdm redraws at most every 0.1 s
        report(200, {"train_perplexity": 6.0, "val_perplexity": 7.0, "tokens_per_s": 9000.0})
        time.sleep(0.2)
        progress(210, 5.5)
        frame = terminal.getvalue().split("\r")[-1]
    assert "210/600" in frame and "step" in frame, frame
    assert "train_ppl=5.500" in frame and "val_ppl=7.000" in frame, frame


def test_without_a_terminal_the_bar_is_off_and_its_reports_are_harmless(monkeypatch) -> None:
    import io
    from tasks.train_lm import progress_bar
    monkeypatch.setattr(sys, "stderr", io.StringIO())        # a log file, CI, a worker
    with progress_bar("lstm", 600, "step") as (report, progress):
        progress(10, 30.0)
        report(200, {"train_perplexity": 6.0, "val_perplexity": 7.0, "tokens_per_s": 9000.0})
    assert sys.stderr.getvalue() == ""
