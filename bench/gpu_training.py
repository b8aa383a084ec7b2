"""Trainings on one device, trained by seqlm.train exactly as the train_lm stage trains them, with
the final and best perplexities and the wall time of each: by default the main job's (rnn_scratch
and rnn, the chapter's 500 epochs); with --params experiments/shakespeare.yaml the raw-text
experiment by steps, with the validation loss in nats per character at every evaluation and the
cumulative training time it was reached at.

It needs only torch, numpy, pandas, pyarrow, pydantic and pyyaml, so it runs on a GPU machine
without the pipeline's services (Prefect, MLflow, DVC), which are CPU work that a GPU does not
change. bench/gpu.sh runs it with --device cuda.

    python bench/gpu_training.py --device cuda
    python bench/gpu_training.py --device cpu --epochs 3        # the CPU fallback, quickly
    python bench/gpu_training.py --device cuda --params experiments/shakespeare.yaml \
        --set train_lm.batch_size=256 --set train_lm.hidden=1024
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from seqlm.params import Params, load_params
from seqlm.protocol import split_of
from seqlm.text import Vocab, count_tokens, read_text
from seqlm.train import train

REPO = Path(__file__).resolve().parents[1]
WITHIN_S, TARGET_NATS = 180.0, 1.40     # on a GPU: the raw-text experiment's target


def corpus_of(params: Params) -> tuple[np.ndarray, Vocab]:
    """The character ids and vocabulary preprocess makes of the first local source."""
    source = next(REPO / s for s in params.download.sources if "://" not in s)
    clean = params.preprocess.clean
    vocab = Vocab(count_tokens(source, clean=clean)["char"])
    return np.asarray(vocab[list(read_text(source, clean))], dtype=np.int64), vocab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--epochs", type=int, default=None, help="default: the params file's")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a train_lm or preprocess key, e.g. train_lm.batch_size=256")
    args = parser.parse_args()
    data = load_params(args.params).model_dump(mode="json")
    data["train_lm"].update(device=args.device, compile=args.compile,
                            **({"epochs": args.epochs} if args.epochs else {}))
    for item in args.set:
        key, _, value = item.partition("=")
        section, name = key.split(".")
        data[section][name] = yaml.safe_load(value)
    params = Params.model_validate(data)
    corpus, vocab = corpus_of(params)
    pre, lm = params.preprocess, params.train_lm
    split = split_of(len(corpus), pre.train_tokens, pre.val_tokens, pre.test_tokens)
    name = (torch.cuda.get_device_name() if args.device == "cuda" else "cpu")
    print(f"device: {args.device} ({name}), torch {torch.__version__}, {args.params.name}, "
          f"{len(corpus):,} characters ({split.train_end:,} train, {split.scored:,} validate), "
          f"{lm.budget} {lm.unit}s, compile {args.compile}, overrides {args.set or 'none'}")
    print(f"{'model':12s} {'wall s':>8s} {'tok/s':>10s} {'train ppl':>10s} {'val ppl':>8s} "
          f"{'best ' + lm.unit:>10s} {'best val':>9s} {'nats/char':>9s}")
    for model in lm.models:
        curve: list[tuple[int, float, float]] = []
        elapsed = 0.0

        def on_epoch(done: int, metrics: dict[str, float]) -> None:
            nonlocal elapsed
            elapsed += metrics["seconds"]
            curve.append((done, elapsed, math.log(metrics["val_perplexity"])))
        start = time.perf_counter()
        result = train(model, corpus, vocab, params, on_epoch=on_epoch)
        wall = time.perf_counter() - start
        last, best = result.history[-1], result.best
        speed = np.median([row["tokens_per_s"] for row in result.history])
        print(f"{model:12s} {wall:8.1f} {speed:10,.0f} {last['train_perplexity']:10.3f} "
              f"{last['val_perplexity']:8.2f} {int(best[lm.unit]):10d} "
              f"{best['val_perplexity']:9.3f} {math.log(best['val_perplexity']):9.4f}")
        if lm.unit == "step":
            for step, seconds, nats in curve:
                print(f"  step {step:6d} after {seconds:7.1f} s of training: {nats:.4f} nats/char")
            within = [nats for _, seconds, nats in curve if seconds <= WITHIN_S]
            if within and args.device == "cuda":
                print(f"  best within {WITHIN_S:.0f} s: {min(within):.4f} nats/char (target <= "
                      f"{TARGET_NATS}: {'met' if min(within) <= TARGET_NATS else 'not met'})")


if __name__ == "__main__":
    main()
