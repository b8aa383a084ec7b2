"""sine: the synthetic series of D2L 8.1, x_t = sin(0.01 t) + noise, t = 1..T."""
from __future__ import annotations

from seqlm.io import atomic_path
from seqlm.params import Params
from seqlm.runtime.records import Record, stage_task
from seqlm.stages import STAGE_BY_NAME
from seqlm.threads import beside_the_trainings

STAGE = STAGE_BY_NAME["sine"]


@stage_task("sine")
def sine(params: Params) -> Record:
    import pyarrow as pa                                 # with torch: only when it runs
    import pyarrow.parquet as pq
    from seqlm.autoregress import sine_series
    beside_the_trainings(params)
    t, x = sine_series(params.sine.T, params.sine.noise_std, params.seed)
    table = pa.table({"t": pa.array(t.numpy(), pa.int64()), "x": pa.array(x.numpy(), pa.float32())})
    with atomic_path(STAGE.at(params).outs.series) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return {}
