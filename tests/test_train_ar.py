"""train_ar stage: the seed's training numbers, the three kinds of predictions, their files,
reproducibility and the size errors."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from seqlm import autoregress as ar
from seqlm.io import file_digest
from seqlm.params import load_params
from seqlm.stages import AR_DIR, SINE, STAGE_BY_NAME
from tasks.sine import sine
from tasks.train_ar import _read_series, fit, train_ar
from conftest import REPO, write_params

REPORT = "reports/train_ar.json"
FILES = ("model.pt", "history.csv", "predictions.parquet", "kstep.csv", "kstep_preds.parquet",
         "onestep.png", "multistep.png", "kstep.png")


def run(on_epoch=None) -> list[Path]:
    """The sine and train_ar stages; with `on_epoch`, the training itself (tasks.train_ar.fit),
    which reports each epoch to it. Returns the files of the stage's outputs."""
    params = load_params()
    sine.fn(params)
    if on_epoch is None:
        train_ar.fn(params)
    else:
        fit(params, *_read_series(SINE), on_epoch)
    return [path for path in [*(Path(AR_DIR, name) for name in FILES), Path(REPORT)]
            if path.exists()]


def load_net(path: Path) -> torch.nn.Module:
    checkpoint = torch.load(path)
    net = ar.build_mlp(checkpoint["config"]["tau"], checkpoint["config"]["hidden"], torch.Generator())
    net.load_state_dict(checkpoint["state_dict"])
    return net


@dataclass
class DefaultRun:
    root: Path
    written: list[Path]
    epochs: list[tuple[int, dict[str, float]]]
    global_rng_untouched: bool

    def report(self) -> dict[str, float]:
        return json.loads((self.root / REPORT).read_text())


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> DefaultRun:
    """One run on the shipped params.yaml (seed 0), shared: each run draws three figures."""
    root = tmp_path_factory.mktemp("train_ar")
    shutil.copy(REPO / "params.yaml", root)
    epochs: list[tuple[int, dict[str, float]]] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        rng_before = torch.random.get_rng_state()
        written = run(lambda epoch, metrics: epochs.append((epoch, metrics)))
        untouched = torch.equal(torch.random.get_rng_state(), rng_before)
    return DefaultRun(root, written, epochs, untouched)


def test_defaults_match_the_seed_and_write_the_declared_outputs(default_run: DefaultRun) -> None:
    # All randomness comes from seeded generators: the process-wide RNG is left alone.
    assert default_run.global_rng_untouched
    root = default_run.root
    declared = STAGE_BY_NAME["train_ar"].at(load_params(root / "params.yaml"))
    assert list(declared.outs.values()) == [AR_DIR] and list(declared.metrics.values()) == [REPORT]
    assert sorted(default_run.written) == sorted([Path(AR_DIR, name) for name in FILES] + [Path(REPORT)])
    assert all((root / path).stat().st_size > 0 for path in default_run.written)
    assert not list((root / AR_DIR).glob("*.tmp"))

    report = default_run.report()
    assert set(report) == {"train_loss", "multistep_mse", "kstep_mse_1", "kstep_mse_4",
                           "kstep_mse_16", "kstep_mse_64"}
    assert 0.03 < report["train_loss"] < 0.08                   # seed: 0.0508 after 5 epochs
    kstep = [report[f"kstep_mse_{k}"] for k in (1, 4, 16, 64)]
    assert kstep == sorted(kstep) and kstep[0] < kstep[-1] / 2   # errors grow with k
    assert 0.03 < kstep[0] < 0.1                                 # 1-step ≈ the noise variance 0.04
    assert report["multistep_mse"] > kstep[0]

    history = pd.read_csv(root / AR_DIR / "history.csv")
    assert list(history.columns) == ["epoch", "train_loss"] and list(history.epoch) == [1, 2, 3, 4, 5]
    assert [e for e, _ in default_run.epochs] == [1, 2, 3, 4, 5]
    assert [m["train_loss"] for _, m in default_run.epochs] == list(history.train_loss)
    assert float(f"{history.train_loss.iloc[-1]:.4g}") == report["train_loss"]     # 4 digits
    table = pd.read_csv(root / AR_DIR / "kstep.csv")
    assert list(table.k) == [1, 4, 16, 64]
    assert [float(f"{mse:.4g}") for mse in table.mse] == kstep     # the full values, and as reported


def test_predictions_follow_the_seed_definitions(default_run: DefaultRun) -> None:
    root = default_run.root
    p = load_params(root / "params.yaml").train_ar
    tau, n_train, T = p.tau, p.n_train, 1000
    preds = pd.read_parquet(root / AR_DIR / "predictions.parquet")
    assert list(preds.columns) == ["t", "x", "onestep", "multistep"]
    assert [str(d) for d in preds.dtypes] == ["int64", "float32", "float32", "float32"]
    assert list(preds.t) == list(range(1, T + 1))
    assert np.array_equal(preds.x, pd.read_parquet(root / SINE).x)
    x = torch.tensor(preds.x.to_numpy())

    # model.pt rebuilds the trained net: its 1-step predictions are the stored ones.
    net = load_net(root / AR_DIR / "model.pt")
    features, _ = ar.windows(x, tau)
    with torch.no_grad():
        onestep = net(features).reshape(-1).numpy()
        first_multistep = net(x[n_train:n_train + tau].reshape(1, -1)).item()
    assert preds.onestep[:tau].isna().all() and not preds.onestep[tau:].isna().any()
    np.testing.assert_allclose(preds.onestep[tau:], onestep, rtol=1e-6)
    start = n_train + tau
    assert preds.multistep[:start].isna().all() and not preds.multistep[start:].isna().any()
    assert preds.multistep[start] == pytest.approx(first_multistep, rel=1e-6)
    assert not np.allclose(preds.multistep[start:], preds.onestep[start:])   # fed back, not observed

    # k-step: rows r = 0 .. T - tau - 64, the k-step prediction of row r lands at t = r + tau + k.
    kpreds = pd.read_parquet(root / AR_DIR / "kstep_preds.parquet")
    assert list(kpreds.columns) == ["k", "t", "prediction"]
    rows = T - tau - 64 + 1
    report = default_run.report()
    for k, group in kpreds.groupby("k"):
        assert list(group.t) == list(range(tau + k, tau + k + rows))
        # Held out: rows r >= n_train, i.e. targets at t >= n_train + tau + k.
        held = group[group.t >= n_train + tau + k]
        assert len(held) == rows - n_train
        mse = np.mean((held.prediction.to_numpy() - preds.x.to_numpy()[held.t - 1]) ** 2)
        assert mse == pytest.approx(report[f"kstep_mse_{k}"], rel=1e-3)   # 4 digits
    one = kpreds[kpreds.k == 1]
    np.testing.assert_allclose(one.prediction, preds.onestep[one.t - 1], rtol=1e-6)
    observed = preds.multistep[start:] - preds.x[start:]
    assert report["multistep_mse"] == pytest.approx(float(np.mean(observed ** 2)), rel=1e-3)


def test_same_seed_same_series_weights_and_metrics(default_run: DefaultRun, workdir: Path) -> None:
    def weights(root: Path) -> dict[str, torch.Tensor]:
        return torch.load(root / AR_DIR / "model.pt")["state_dict"]

    run()
    first = default_run.root
    assert file_digest(SINE) == file_digest(first / SINE)
    assert Path(REPORT).read_text() == (first / REPORT).read_text()
    for name in ("predictions.parquet", "kstep_preds.parquet", "history.csv", "kstep.csv"):
        assert file_digest(Path(AR_DIR, name)) == file_digest(first / AR_DIR / name)
    again, before = weights(workdir), weights(first)
    assert again.keys() == before.keys()
    assert all(torch.equal(before[name], again[name]) for name in before)
    write_params(workdir, seed=1)
    run()
    assert not torch.equal(weights(workdir)["0.weight"], before["0.weight"])


def test_smallest_series_leaves_one_held_out_row(workdir: Path) -> None:
    # need T >= n_train + tau + max(k_steps) = 40 + 3 + 8 = 51
    write_params(workdir, sine={"T": 51}, train_ar={"n_train": 40, "tau": 3, "k_steps": [2, 8],
                                                   "epochs": 2})
    run()
    kpreds = pd.read_parquet(Path(AR_DIR, "kstep_preds.parquet"))
    assert kpreds.groupby("k").size().to_dict() == {2: 41, 8: 41}
    report = json.loads(Path(REPORT).read_text())
    assert set(report) == {"train_loss", "multistep_mse", "kstep_mse_2", "kstep_mse_8"}
    assert np.isfinite(list(report.values())).all()


@pytest.mark.parametrize(("sections", "message"), [
    ({"sine": {"T": 667}},
     r"sine.T = 667 is too short for train_ar: needs at least n_train \+ tau \+ max\(k_steps\) = 668"),
    ({"sine": {"T": 100}, "train_ar": {"n_train": 10, "k_steps": [1, 128]}}, r"= 142"),
    ({"train_ar": {"k_steps": [1, 4, 4]}}, r"train_ar.k_steps = \[1, 4, 4\]: Value error, lists a horizon twice"),
])
def test_sizes_that_do_not_fit_fail_before_writing(workdir: Path, sections: dict, message: str) -> None:
    write_params(workdir, **sections)
    with pytest.raises(ValueError, match=message) as error:
        run()
    assert "\n" not in str(error.value)
    assert not Path(AR_DIR).exists() and not Path(REPORT).exists()


def test_missing_or_broken_series(workdir: Path) -> None:
    params = load_params()
    with pytest.raises(FileNotFoundError, match=r"data/sine/series.parquet: not found; run the sine"):
        train_ar.fn(params)
    sine.fn(params)
    frame = pd.read_parquet(SINE)
    frame.loc[10, "x"] = np.nan
    frame.to_parquet(SINE)
    with pytest.raises(ValueError, match="column x holds NaN"):
        train_ar.fn(params)
    frame.rename(columns={"x": "y"}).to_parquet(SINE)
    with pytest.raises(ValueError, match="not a series with columns t, x"):
        train_ar.fn(params)
    assert not Path(AR_DIR).exists()


def test_diverging_loss_names_the_epoch(workdir: Path) -> None:
    write_params(workdir, train_ar={"lr": 1e30})
    with pytest.raises(FloatingPointError, match="training loss is .* at epoch 1"):
        run()
    assert not Path(AR_DIR).exists()
