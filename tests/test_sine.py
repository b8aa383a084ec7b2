"""sine stage: the seeded series file, its format and its byte-for-byte reproducibility."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from seqlm.io import file_digest
from seqlm.params import load_params
from seqlm.stages import SINE, STAGE_BY_NAME
from tasks.sine import sine
from conftest import write_params


def test_series_format_and_values(workdir: Path) -> None:
    params = load_params()
    assert sine.fn(params)["stage"] == "sine"
    assert list(STAGE_BY_NAME["sine"].at(params).outs.values()) == [SINE]
    meta = pq.ParquetFile(SINE).metadata
    assert all(meta.row_group(0).column(i).compression == "ZSTD" for i in range(2))
    table = pq.read_table(SINE)
    assert table.schema.names == ["t", "x"]
    assert str(table.schema.field("t").type) == "int64" and str(table.schema.field("x").type) == "float"
    t, x = table["t"].to_numpy(), table["x"].to_numpy()
    assert np.array_equal(t, np.arange(1, 1001))
    noise = x - np.sin(0.01 * t)
    assert abs(noise.mean()) < 0.03 and 0.18 < noise.std() < 0.22   # N(0, 0.2²), 1000 draws
    assert not list(Path(SINE).parent.glob("*.tmp"))                  # no temp file left behind


def test_noise_free_series_is_the_sine(workdir: Path) -> None:
    write_params(workdir, sine={"T": 50, "noise_std": 0.0},
                 train_ar={"n_train": 20, "tau": 4, "k_steps": [1, 4]})
    sine.fn(load_params())
    x = pq.read_table(SINE)["x"].to_numpy()
    np.testing.assert_allclose(x, np.sin(0.01 * np.arange(1, 51)), rtol=0, atol=1e-6)


def test_same_seed_same_bytes_other_seed_other_series(workdir: Path) -> None:
    sine.fn(load_params())
    first = file_digest(SINE)
    Path(SINE).unlink()
    sine.fn(load_params())
    assert file_digest(SINE) == first
    x0 = pq.read_table(SINE)["x"].to_numpy()
    write_params(workdir, seed=1)
    sine.fn(load_params())
    assert file_digest(SINE) != first
    assert not np.allclose(pq.read_table(SINE)["x"].to_numpy(), x0)
