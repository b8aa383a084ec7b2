"""The shipped tinyshakespeare experiment beside the peer a user would pick instead: karpathy/nanoGPT's
character-level recipe, on the same file and the same split, in one sitting.

1. nanoGPT (its repository in the git-ignored bench/.peers/nanoGPT, cloned at PEER_COMMIT unless
   --nanogpt names a checkout): data/shakespeare_char/prepare.py on the repository's copy of
   tinyshakespeare (its first 90 % of the characters train, the last 10 % validate), then the
   command its README publishes for a CPU (NANOGPT_CPU); its wall time, the validation loss it
   prints (a mean over 20 random batches of 12 x 64 characters), and its kept checkpoint scored
   on the whole validation text (every position of consecutive 64-character blocks, the
   positions its own estimate averages over).
2. `seqlm run --params experiments/shakespeare.yaml` in a fresh clone of this checkout's HEAD
   (its own Prefect home, MLflow store and DVC remote): its wall time from the command to the
   prompt, the kept model's validation loss on the whole validation text, and the loss at its
   last evaluation whose cumulative training time is within the peer's whole wall time.

Losses are cross-entropies in nats per character (perplexity = e^loss). On a GPU (`--device
cuda`) nanoGPT runs its GPU recipe (config/train_shakespeare_char.py as published) and the
experiment its CUDA settings.

    python bench/peers.py                  # ~15 minutes on a 2-core CPU
    python bench/peers.py --skip-peer      # the experiment alone
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO / "bench" / ".peers"                       # git-ignored
PEER_URL = "https://github.com/karpathy/nanoGPT"
PEER_COMMIT = "3adf61e154c3fe3fca428ad6bc3818b27a3b8291"
CORPUS = REPO / "data" / "mirror" / "tinyshakespeare.txt"
EXPERIMENT = "experiments/shakespeare.yaml"
NANOGPT_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
               "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12",
               "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
               "--lr_decay_iters=2000", "--dropout=0.0"]
NANOGPT_GPU = ["config/train_shakespeare_char.py"]
TARGETS = {"cpu": (1.47, 1.60), "cuda": (1.40, None)}    # whole run; at the peer's wall time

# Scores nanoGPT's kept checkpoint on every position of its validation text, in consecutive
# blocks of its context length. Run with nanoGPT's folder as the working directory.
SCORE_PEER = """
import json, math, sys
import numpy as np, torch
from model import GPT, GPTConfig
ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
model = GPT(GPTConfig(**ckpt["model_args"]))
state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
model.load_state_dict(state)
model.eval()
ids = torch.from_numpy(np.fromfile("data/shakespeare_char/val.bin", dtype=np.uint16).astype(np.int64))
block = ckpt["model_args"]["block_size"]
total, count = 0.0, 0
with torch.no_grad():
    for start in range(0, len(ids) - 1, block * 64):
        chunk = ids[start:start + block * 64 + 1]
        n = (len(chunk) - 1) // block * block
        if n == 0:
            x, y = chunk[:-1][None], chunk[1:][None]
        else:
            x, y = chunk[:n].view(-1, block), chunk[1:n + 1].view(-1, block)
        logits, _ = model(x, y)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1),
                                                 reduction="sum")
        total, count = total + float(loss), count + y.numel()
        rest = len(chunk) - 1 - n
        if n and rest:
            x, y = chunk[n:-1][None], chunk[n + 1:][None]
            logits, _ = model(x, y)
            total += float(torch.nn.functional.cross_entropy(
                logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="sum"))
            count += y.numel()
print(json.dumps({"val_nats": total / count, "scored": count, "iter": ckpt["iter_num"]}))
"""


def peer_checkout(given: Path | None) -> Path:
    """nanoGPT's tree at PEER_COMMIT in bench/.peers/nanoGPT (a clone of `given`, a local
    repository, or of its GitHub repository)."""
    target = PEERS / "nanoGPT"
    if not (target / "train.py").exists():
        PEERS.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "-q", str(given or PEER_URL), str(target)], check=True)
        subprocess.run(["git", "-C", str(target), "checkout", "-q", PEER_COMMIT], check=True)
    return target


def run_peer(peer: Path, device: str) -> dict:
    data = peer / "data" / "shakespeare_char"
    shutil.copy(CORPUS, data / "input.txt")
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)
    out = peer / "out-shakespeare-char"
    shutil.rmtree(out, ignore_errors=True)
    recipe = NANOGPT_CPU if device == "cpu" else NANOGPT_GPU
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "train.py", *recipe], cwd=peer, capture_output=True,
                            text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"nanoGPT failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    evals = [(int(step), float(val)) for step, val in
             re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", result.stdout)]
    scored = subprocess.run([sys.executable, "-c", SCORE_PEER, str(out / "ckpt.pt")], cwd=peer,
                            capture_output=True, text=True, check=True)
    return {"wall_s": wall, "printed_val_nats": min(v for _, v in evals),
            "last_printed": evals[-1], **json.loads(scored.stdout.splitlines()[-1])}


def run_experiment(overrides: list[str]) -> dict:
    """The experiment in a fresh clone of HEAD, with this interpreter's environment, its keys
    overridden by `overrides` (KEY=VALUE, a YAML value)."""
    import yaml
    with tempfile.TemporaryDirectory(prefix="seqlm-peers-") as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        params = yaml.safe_load((clone / EXPERIMENT).read_text())
        for item in overrides:
            key, _, value = item.partition("=")
            *sections, last = key.split(".")
            node = params
            for section in sections:
                node = node[section]
            node[last] = yaml.safe_load(value)
        (clone / EXPERIMENT).write_text(yaml.safe_dump(params, sort_keys=False))
        env = {**os.environ, "PREFECT_HOME": str(clone / ".prefect"),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        env.pop("MLFLOW_TRACKING_URI", None)
        command = [sys.executable, "-m", "seqlm.cli", "run", "--params", EXPERIMENT]
        start = time.perf_counter()
        result = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode:
            sys.exit(f"seqlm run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return {"wall_s": wall, **_training_curve(clone)}


def _training_curve(clone: Path) -> dict:
    """The kept model's numbers (reports/summary.csv) and, per evaluation, the cumulative
    training seconds and validation loss (its MLflow run)."""
    import pandas as pd
    from mlflow import MlflowClient
    summary = pd.read_csv(clone / "reports" / "summary.csv").set_index("model")
    client = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("seqlm")
    models = [name for name in summary.index if "steps" in summary and
              not math.isnan(summary.loc[name, "steps"])]
    curves = {}
    for name in models:
        run = client.search_runs([experiment.experiment_id],
                                 filter_string=f"attributes.run_name = '{name}'")[0]
        seconds = client.get_metric_history(run.info.run_id, "seconds")
        val = {m.step: m.value for m in client.get_metric_history(run.info.run_id,
                                                                  "val_perplexity")}
        elapsed, points = 0.0, []
        for metric in sorted(seconds, key=lambda m: m.step):
            elapsed += metric.value
            points.append((metric.step, elapsed, math.log(val[metric.step])))
        curves[name] = points
    return {"summary": summary.reset_index().to_dict("records"), "curves": curves}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--nanogpt", type=Path, help="a local nanoGPT repository to clone from")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the experiment (YAML value), e.g. "
                             "train_lm.batch_size=256")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "bench"))
    from main_job import cpu_name

    peer = None if args.skip_peer else run_peer(peer_checkout(args.nanogpt), args.device)
    ours = run_experiment([*(["train_lm.device=cuda"] if args.device == "cuda" else []),
                           *args.set])
    whole, at_peer = TARGETS[args.device]
    lines = [f"machine: {os.cpu_count()} cores ({cpu_name()}), device {args.device}; "
             f"overrides: {args.set or 'none'}; "
             f"{time.strftime('%Y-%m-%d')}; corpus {CORPUS.name} (first 1,003,854 characters "
             "train, last 111,540 validate)", ""]
    if peer:
        lines += [f"nanoGPT {PEER_COMMIT[:7]} ({' '.join(NANOGPT_CPU if args.device == 'cpu' else NANOGPT_GPU)}):",
                  f"  wall {peer['wall_s']:.1f} s, command to exit",
                  f"  val loss it prints (20 random batches): best {peer['printed_val_nats']:.4f} "
                  f"nats/char; at step {peer['last_printed'][0]}: {peer['last_printed'][1]:.4f}",
                  f"  its kept checkpoint (iter {peer['iter']}) on the whole validation text "
                  f"({peer['scored']:,} characters): {peer['val_nats']:.4f} nats/char", ""]
    lines += [f"seqlm run --params {EXPERIMENT}: wall {ours['wall_s']:.1f} s, command to prompt"]
    for row in ours["summary"]:
        nats = row["val_nats_best"]
        lines.append(f"  {row['model']:18s} val {nats:.4f} nats/char "
                     f"({nats / math.log(2):.4f} bits, perplexity {math.exp(nats):.3f})")
    for name, points in ours["curves"].items():
        best = min(points, key=lambda p: p[2])
        lines.append(f"  {name}: {len(points)} evaluations; best at step {best[0]} after "
                     f"{best[1]:.0f} s of training: {best[2]:.4f} nats/char")
        if peer:
            # the last evaluation within the peer's whole wall time (command to exit)
            step, elapsed, nats = max((p for p in points if p[1] <= peer["wall_s"]),
                                      key=lambda p: p[1], default=points[0])
            lines.append(f"  {name} at its last evaluation within the peer's wall time "
                         f"({peer['wall_s']:.0f} s): step {step} after {elapsed:.0f} s of "
                         f"training: {nats:.4f} nats/char (peer {peer['val_nats']:.4f}: "
                         f"{peer['val_nats'] - nats:+.4f})")
            if at_peer:
                lines.append(f"    target below {at_peer} nats/char: "
                             f"{'met' if nats < at_peer else 'not met'}")
        kept = min(row["val_nats_best"] for row in ours["summary"] if row["model"] == name)
        lines.append(f"  {name} kept model {kept:.4f} nats/char, run {ours['wall_s']:.0f} s: "
                     f"target <= {whole} nats/char in <= 600 s: "
                     f"{'met' if kept <= whole and ours['wall_s'] <= 600 else 'not met'}")
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
