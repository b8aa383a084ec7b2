"""The README's reference numbers, measured on a fresh clone of this checkout's HEAD.

Runs README Quick start command 1 (set-up, then the main job on the defaults) and the
full-corpus experiment in a clone, times each, reads what they wrote (reports/summary.csv and
the MLflow runs) and writes bench/results/reference-<machine>.md; with --readme it also puts the
tables into README.md between the `reference:` markers.

    python bench/reference.py --readme              # ~35 minutes on a 2-core CPU
    python bench/reference.py --readme --main-only  # the main job only, ~8 minutes
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd

from main_job import cpu_name

REPO = Path(__file__).resolve().parents[1]
FULL_CORPUS = "experiments/full-corpus.yaml"


def quick_start_command() -> tuple[str, str]:
    """README command 1, split into its set-up part and the final `seqlm run`."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    command = block[1].strip().splitlines()[0] if block else ""
    setup, _, run = command.rpartition(" && ")
    if not run.endswith("seqlm run"):
        raise SystemExit(f"README.md: command 1 does not end with `seqlm run`: {command!r}")
    return setup, run


def timed(command: str, cwd: Path, log: Path) -> float:
    print(f"+ {command}", flush=True)
    start = time.perf_counter()
    with open(log, "a") as out:
        subprocess.run(command, shell=True, cwd=cwd, check=True, stdout=out,
                       stderr=subprocess.STDOUT, executable="/bin/bash")
    return time.perf_counter() - start


def training_runs(clone: Path) -> pd.DataFrame:
    """Per trained model of the latest pipeline run: training wall seconds and mean tokens/s."""
    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("seqlm")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    rows = [{"model": r.info.run_name, "train_wall_s": r.data.metrics.get("train_wall_s"),
             "tokens_per_s": r.data.metrics.get("mean_tokens_per_s")}
            for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return pd.DataFrame(rows, columns=["model", "train_wall_s", "tokens_per_s"])


def table(summary: pd.DataFrame, timings: pd.DataFrame) -> str:
    frame = summary.merge(timings, on="model", how="left")

    def num(value: object, spec: str) -> str:
        return "" if pd.isna(value) else format(value, spec)

    lines = ["| model | epochs | best epoch | train ppl (final) | val ppl (final) | "
             "val ppl (kept) | training wall s | tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in frame.to_dict("records"):
        lines.append(" | ".join([
            f"| {row['model']}", num(row["epochs"], ".0f"), num(row["best_epoch"], ".0f"),
            num(row["train_ppl"] if pd.isna(row["train_ppl_last"]) else row["train_ppl_last"],
                ".3f"), num(row["val_ppl_last"], ".2f"),
            num(row["val_ppl_best"], ".3f"), num(row["train_wall_s"], ".0f"),
            num(row["tokens_per_s"], ",.0f")]) + " |")
    return "\n".join(lines)


def machine() -> str:
    gpu = "a CUDA GPU" if _has_cuda() else "no GPU"
    return f"{os.cpu_count()} cores ({cpu_name()}), {gpu}, {platform.system()} {platform.release()}"


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def previous_full_corpus(results: Path) -> str:
    """The full-corpus section of an earlier results file, kept by a --main-only run, with the
    date, commit and machine it was measured on (machines of one name differ: see
    main_job.cpu_name)."""
    text = results.read_text(encoding="utf-8") if results.exists() else ""
    section = re.search(r"\n### The whole corpus.*", text, re.S)
    if section is None:
        return ""
    kept = section[0]
    header = re.search(r"Measured (\S+) by `python bench/reference.py` on a fresh clone "
                       r"\(commit (\w+)\)", text)
    if "Measured" not in kept and header:     # a file of the older layout: one header for both
        kept = re.sub(r"(\n\n)(\d+ s wall)", rf"\1Measured {header[1]} by `python "
                      rf"bench/reference.py` on a fresh clone (commit {header[2]}). \2", kept,
                      count=1)
    machine_line = re.search(r"^Machine: (.*)\.$", text, re.M)
    if machine_line:                          # the machine was the file's, not the section's
        kept = re.sub(r"(on a fresh clone \(commit \w+\))\.",
                      lambda m: f"{m[1]}, on {machine_line[1]}.", kept, count=1)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=f"cpu-{os.cpu_count()}core",
                        help="machine tag in the results file name")
    parser.add_argument("--readme", action="store_true", help="update README.md's tables")
    parser.add_argument("--main-only", action="store_true",
                        help="the main job only, not the full-corpus experiment; keeps the full-corpus "
                             "section of the results file")
    args = parser.parse_args()
    setup, run = quick_start_command()
    with tempfile.TemporaryDirectory(prefix="seqlm-reference-") as tmp:
        clone, log = Path(tmp) / "clone", Path(tmp) / "log.txt"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, check=True,
                                capture_output=True, text=True).stdout.strip()
        try:
            setup_s = timed(setup, clone, log)
            main_s = timed(run, clone, log)
            default = table(pd.read_csv(clone / "reports/summary.csv"), training_runs(clone))
            full_cmd = f"{run} --params {FULL_CORPUS}"
            if not args.main_only:
                full_s = timed(full_cmd, clone, log)
                full = table(pd.read_csv(clone / "reports/summary.csv"), training_runs(clone))
        except subprocess.CalledProcessError:
            print(log.read_text()[-4000:])
            raise
    out = REPO / "bench" / "results" / f"reference-{args.name}.md"
    measured = (f"Measured {datetime.date.today().isoformat()} by `python bench/reference.py` on "
                f"a fresh clone (commit {commit}), on {machine()}.")
    body = (f"### The main job (`{run}`, defaults of params.yaml)\n\n{measured} "
            f"Set-up {setup_s:.0f} s, then the main job {main_s:.0f} s wall.\n\n{default}\n")
    if not args.main_only:
        body += f"\n### The whole corpus (`{full_cmd}`)\n\n{measured} {full_s:.0f} s wall.\n\n{full}\n"
    else:
        body += previous_full_corpus(out)
    out.write_text(f"# Reference results\n\n{body}", encoding="utf-8")
    print(body)
    print(f"wrote {out.relative_to(REPO)}")
    if args.readme:
        readme = REPO / "README.md"
        text = readme.read_text(encoding="utf-8")
        marked = re.compile(r"(<!-- reference:start -->\n).*?(<!-- reference:end -->)", re.S)
        if not marked.search(text):
            raise SystemExit("README.md has no <!-- reference:start/end --> markers")
        readme.write_text(marked.sub(lambda m: m[1] + body + m[2], text), encoding="utf-8")
        print(f"updated {readme.relative_to(REPO)} ({shlex.quote(str(out.name))})")


if __name__ == "__main__":
    main()
