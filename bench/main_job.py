"""The main job's wall time per stage and in total, beside d2l's bare training of the same models,
then a re-run with nothing changed.

0. Its peer: the chapter's own training of the main job's two models, d2l's train_ch8 end to end
   (bench/train_speed.py --whole-training: the seed loop, 500 epochs of rnn_scratch then of
   rnn, torch's default threads), in a process of its own just before;
In a fresh clone of this checkout's HEAD (its own Prefect home, MLflow store and DVC remote),
on an existing virtual environment:
1. `seqlm run` with the defaults (`--set key=value` overrides them, e.g. train_lm.device=cuda):
   wall time from the command to the prompt, and each stage's task run as Prefect recorded it;
2. `seqlm run` again, nothing changed: its wall time, split into what it is made of: start-up
   until the flow run begins (imports, the temporary server, which boots while this process
   imports and checks the machine and the MLflow store), the stages' task runs (per cached
   stage too), the rest of the flow run (MLflow, `dvc commit` + `dvc push`, bookkeeping) and
   the exit; and, for reference, the imports alone.

    python bench/main_job.py                       # ~6 minutes on a 2-core CPU
    python bench/main_job.py --set train_lm.device=cuda
    python bench/main_job.py --baseline-epochs 0   # without the peer
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TARGET_S, TARGET_RATIO, TARGET_NOOP_S = 120.0, 1.7, 6.0     # the goals on 2 CPU cores


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, the Unix time it started)."""
    started, start = time.time(), time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start, started


def stage_times(clone: Path) -> list[tuple[str, float, float, dict[str, float], float]]:
    """Per flow run (oldest first): its name, start (Unix time), duration, each task run's
    duration, and the span from the first task run's start to the last one's end (what the
    stages cost the flow, its own work between them included), from the run's Prefect home."""
    os.environ["PREFECT_HOME"] = str(clone / ".prefect")
    os.environ.pop("PREFECT_API_URL", None)
    from seqlm.runtime.server import start_temporary_server
    start_temporary_server()
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_ASC)
        out = []
        for flow_run in runs:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[flow_run.id])))
            span = (max(t.end_time for t in tasks) - min(t.start_time for t in tasks))
            out.append((flow_run.name, flow_run.start_time.timestamp(),
                        flow_run.total_run_time.total_seconds(),
                        {t.name.rsplit("-", 1)[0]: t.total_run_time.total_seconds()
                         for t in tasks}, span.total_seconds()))
    return out


def cpu_name() -> str:
    """The CPU as /proc/cpuinfo names it, with its family and model and whether it has AVX-512
    (machines of one name can differ in both: speed, and the float sums of the torch layers)."""
    try:
        info = dict(line.split(":", 1) for line in
                    Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return platform.machine()
    info = {k.strip(): v.strip() for k, v in info.items()}
    avx512 = "avx512f" in info.get("flags", "").split()
    return (f"{info.get('model name', platform.machine())}, family {info.get('cpu family')} "
            f"model {info.get('model')}, AVX-512 {'yes' if avx512 else 'no'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.yaml key (YAML value), e.g. train_lm.epochs=50")
    parser.add_argument("--baseline-epochs", type=int, default=500,
                        help="epochs of d2l's train_ch8 per model, the peer (0: skip it)")
    args = parser.parse_args()
    baseline = {}
    if args.baseline_epochs:
        result = subprocess.run(
            [sys.executable, str(REPO / "bench" / "train_speed.py"), "--whole-training",
             "--epochs", str(args.baseline_epochs), "--models", "rnn_scratch", "rnn"],
            capture_output=True, text=True, check=True)
        baseline = json.loads(result.stdout.splitlines()[-1])
    with tempfile.TemporaryDirectory(prefix="seqlm-bench-") as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        params = yaml.safe_load((clone / "params.yaml").read_text())
        for item in args.set:
            key, _, value = item.partition("=")
            *sections, last = key.split(".")
            node = params
            for section in sections:
                node = node[section]
            node[last] = yaml.safe_load(value)
        (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env = {**os.environ, "PREFECT_HOME": str(clone / ".prefect"),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        env.pop("MLFLOW_TRACKING_URI", None)
        seqlm = [sys.executable, "-m", "seqlm.cli", "run"]
        first, _ = run(seqlm, clone, env)
        again, again_started = run(seqlm, clone, env)
        imports, _ = run([sys.executable, "-c", "import seqlm.cli, flows.pipeline"], clone, env)
        (first_run, _, _, first_stages, _), (_, flow_start, flow_s, again_stages, span) = \
            stage_times(clone)
    print(f"machine: {os.cpu_count()} cores ({cpu_name()}); overrides: {args.set or 'none'}")
    if baseline:
        total = sum(baseline.values())
        print(f"\nd2l train_ch8, bare training ({args.baseline_epochs} epochs of rnn_scratch "
              f"then rnn, torch's threads): {total:.1f} s "
              f"({' + '.join(f'{m} {s:.1f} s' for m, s in baseline.items())})")
    print(f"\nmain job (flow run {first_run}): {first:.1f} s wall, command to prompt"
          f" (target <= {TARGET_S:.0f} s)")
    if baseline:
        print(f"  {sum(baseline.values()) / first:.2f}x d2l's bare training of the same models "
              f"(target >= {TARGET_RATIO}x)")
    for name, seconds in first_stages.items():
        print(f"  {name:24s} {seconds:7.1f} s")
    print(f"\nre-run with nothing changed: {again:.1f} s wall, command to prompt (target <= "
          f"{TARGET_NOOP_S:.0f} s; {first / again:.0f}x faster than the main job)")
    startup = flow_start - again_started
    n = max(len(again_stages), 1)
    print(f"  start-up until the flow run begins          {startup:6.1f} s")
    print(f"    (of which the imports alone take           {imports:6.1f} s)")
    print(f"  the {len(again_stages)} cached stages, first start to last end {span:6.1f} s  "
          f"({span / n:.2f} s per stage; their task runs alone "
          f"{sum(again_stages.values()) / n:.2f} s)")
    print(f"  the rest of the flow run: MLflow, DVC, ...  {flow_s - span:6.1f} s")
    print(f"  after the flow run until the prompt         {again - startup - flow_s:6.1f} s")


if __name__ == "__main__":
    main()
