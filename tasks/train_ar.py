"""train_ar: the autoregressive MLP of D2L 8.1 on the sine series, with its 1-step, multistep
and k-step predictions, errors and the seed's three plots.

torch, pandas, pyarrow and matplotlib are imported in the functions that use them: a run that
finds the stage cached never loads them (bench/main_job.py, the re-run with nothing changed)."""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from seqlm import tracking
from seqlm.io import atomic_path, file_digest, publish, save_torch, write_csv, write_json
from seqlm.params import Params
from seqlm.runtime.records import Record, stage_task
from seqlm.stages import STAGE_BY_NAME
from seqlm.threads import beside_the_trainings

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from matplotlib.figure import Figure

    from seqlm.autoregress import OnEpoch

FORMATS = ("-", "m--", "g-.", "r:")   # d2l.plot's default line formats
STAGE = STAGE_BY_NAME["train_ar"]


def _read_series(path: str) -> tuple[np.ndarray, torch.Tensor]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    try:
        table = pq.read_table(path, columns=["t", "x"])
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; run the sine stage first") from None
    except (pa.ArrowInvalid, KeyError) as exc:
        raise ValueError(f"{path}: not a series with columns t, x: {' '.join(str(exc).split())}") from None
    t = table["t"].to_numpy().astype(np.int64)
    x = torch.from_numpy(table["x"].to_numpy().astype(np.float32))
    if not torch.isfinite(x).all():
        raise ValueError(f"{path}: column x holds NaN or infinite values")
    return t, x


def _plot(path: Path, series: list[tuple[np.ndarray, np.ndarray]], legend: list[str],
          xlim: tuple[int, int]) -> Path:
    """One d2l.plot figure: figsize (6, 3), 'time' vs 'x', grid, d2l's line formats."""
    from seqlm.figures import save_png
    return save_png(path, lambda: _figure(series, legend, xlim))


def _figure(series: list[tuple[np.ndarray, np.ndarray]], legend: list[str],
            xlim: tuple[int, int]) -> Figure:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 3))
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.16, top=0.96)   # fixed: tight_layout is slow
    ax = fig.subplots()
    for (t, y), fmt in zip(series, itertools.cycle(FORMATS)):
        ax.plot(t, y, fmt)
    ax.set(xlabel="time", ylabel="x", xlim=xlim)
    ax.legend(legend)
    ax.grid()
    return fig


def _write_parquet(path: Path, frame: pd.DataFrame) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp, compression="zstd")
    return path


@stage_task("train_ar")
def train_ar(params: Params) -> Record:
    """Train the MLP, write models/ar and reports/train_ar.json, and log the training as the
    MLflow run `ar_mlp`."""
    from seqlm import autoregress as ar
    beside_the_trainings(params)
    paths = STAGE.at(params)
    series = paths.deps.series
    t, x = _read_series(series)
    ar.check_sizes(len(x), params.train_ar.tau, params.train_ar.n_train, params.train_ar.k_steps,
                   series)
    section = {"seed": params.seed, **params.train_ar.model_dump(mode="json")}
    with tracking.training_run(params, "ar_mlp", section) as run:
        run.log_metrics(fit(params, t, x, run.log_epoch))
        run.log_dataset("sine", series, file_digest(series), "training")
        run.log_artifacts([paths.outs.model], "")          # under ar/
    return {"mlflow_run": run.run_id, "tracked": run.error is None,
            "tracking_error": run.error}


def fit(params: Params, t: np.ndarray, x: torch.Tensor, on_epoch: OnEpoch | None = None,
        ) -> dict[str, float]:
    """The chapter's MLP on the series (t, x): trained, its predictions and errors computed,
    then every output written together. Returns the errors (reports/train_ar.json)."""
    # CPU always: a 4→10→1 MLP does microseconds of arithmetic per step, so on a GPU every
    # step would be bound by kernel launches and host syncs, not compute.
    import pandas as pd
    import torch

    from seqlm import autoregress as ar
    from seqlm.threads import use_cpu_threads
    p = params.train_ar
    use_cpu_threads(params)
    T, tau, max_steps = len(x), p.tau, max(p.k_steps)

    generator = torch.Generator().manual_seed(params.seed)
    features, labels = ar.windows(x, tau)
    net = ar.build_mlp(tau, p.hidden, generator)
    history = ar.train(net, features[:p.n_train], labels[:p.n_train], batch_size=p.batch_size,
                       lr=p.lr, epochs=p.epochs, generator=generator, on_epoch=on_epoch)
    with torch.no_grad():
        onestep = torch.cat([torch.full((tau,), math.nan), net(features).reshape(-1)])
    start = p.n_train + tau                       # multistep predicts x[start:] from x[:start]
    multistep = ar.multistep(net, x, tau, start)
    multistep_mse = torch.mean((multistep[start:] - x[start:]) ** 2).item()
    kpreds = ar.kstep(net, x, tau, max_steps)
    kstep_mse = ar.kstep_heldout_mse(kpreds, x, tau, p.n_train, p.k_steps)

    # Everything is computed: only now write, all outputs together.
    rows = kpreds.shape[0]
    # Row r's k-step prediction is of x[r + tau + k - 1], i.e. time t = r + tau + k.
    kt = {k: t[tau + k - 1: tau + k - 1 + rows] for k in p.k_steps}
    x_np, onestep_np, multistep_np = x.numpy(), onestep.numpy(), multistep.numpy()
    report = {"train_loss": history[-1], "multistep_mse": multistep_mse}
    report.update({f"kstep_mse_{k}": mse for k, mse in kstep_mse.items()})
    # 4 significant digits, as in every metrics file (tasks/evaluate.py SIGNIFICANT): what a
    # person compares in `dvc metrics show` / `diff`; the full values are in kstep.csv.
    report = {name: float(f"{value:.4g}") for name, value in report.items()}
    paths = STAGE.at(params)
    metrics_path = Path(paths.metrics.errors)
    with publish() as outputs:
        out = outputs.folder(paths.outs.model)
        save_torch(out / "model.pt", {"state_dict": net.state_dict(),
                                      "config": {"tau": tau, "hidden": p.hidden},
                                      "params": {"seed": params.seed,
                                                 "train_ar": p.model_dump(mode="json")}})
        write_csv(out / "history.csv", pd.DataFrame(
            {"epoch": np.arange(1, p.epochs + 1), "train_loss": history}))
        _write_parquet(out / "predictions.parquet", pd.DataFrame(
            {"t": t, "x": x_np, "onestep": onestep_np, "multistep": multistep_np}))
        write_csv(out / "kstep.csv", pd.DataFrame(
            {"k": list(kstep_mse), "mse": list(kstep_mse.values())}))
        _write_parquet(out / "kstep_preds.parquet", pd.DataFrame({
            "k": np.repeat(np.asarray(p.k_steps, dtype=np.int64), rows),
            "t": np.concatenate([kt[k] for k in p.k_steps]),
            "prediction": np.concatenate([kpreds[:, k - 1].numpy() for k in p.k_steps])}))
        _plot(out / "onestep.png", [(t, x_np), (t[tau:], onestep_np[tau:])],
              ["data", "1-step preds"], (1, T))
        _plot(out / "multistep.png",
              [(t, x_np), (t[tau:], onestep_np[tau:]), (t[start:], multistep_np[start:])],
              ["data", "1-step preds", "multistep preds"], (1, T))
        _plot(out / "kstep.png", [(kt[k], kpreds[:, k - 1].numpy()) for k in p.k_steps],
              [f"{k}-step preds" for k in p.k_steps], (tau + 1, T))
        write_json(outputs.file(metrics_path), report)
    return report
