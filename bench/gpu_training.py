"""The main job's trainings on one device: rnn_scratch and rnn with the defaults of params.yaml
(the chapter's 500 epochs), trained by seqlm.train exactly as the train_lm stage trains them,
with the final and best perplexities and the wall time of each.

It needs only torch, numpy, pandas, pyarrow, pydantic and pyyaml, so it runs on a GPU machine
without the pipeline's services (Prefect, MLflow, DVC), which are CPU work that a GPU does not
change. bench/gpu.sh runs it with --device cuda.

    python bench/gpu_training.py --device cuda
    python bench/gpu_training.py --device cpu --epochs 3        # the CPU fallback, quickly
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from seqlm.params import Params, load_params
from seqlm.text import Vocab, read_lines, tokenize
from seqlm.train import train

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=None, help="default: params.yaml's")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    args = parser.parse_args()
    data = load_params(REPO / "params.yaml").model_dump(mode="json")
    data["train_lm"].update(device=args.device, compile=args.compile,
                            **({"epochs": args.epochs} if args.epochs else {}))
    params = Params.model_validate(data)
    lines = read_lines(REPO / "data" / "mirror" / "timemachine.txt")
    tokens = tokenize(lines, "char")
    vocab = Vocab(tokens)
    corpus = np.asarray([vocab[t] for line in tokens for t in line], dtype=np.int32)
    name = (torch.cuda.get_device_name() if args.device == "cuda" else "cpu")
    print(f"device: {args.device} ({name}), torch {torch.__version__}, "
          f"epochs {params.train_lm.epochs}, compile {args.compile}")
    print(f"{'model':12s} {'wall s':>8s} {'tok/s':>10s} {'train ppl':>10s} {'val ppl':>8s} "
          f"{'best epoch':>10s} {'best val':>9s}")
    for model in params.train_lm.models:
        start = time.perf_counter()
        result = train(model, corpus, vocab, params)
        wall = time.perf_counter() - start
        last, best = result.history[-1], result.best
        speed = np.median([row["tokens_per_s"] for row in result.history])
        print(f"{model:12s} {wall:8.1f} {speed:10,.0f} {last['train_perplexity']:10.3f} "
              f"{last['val_perplexity']:8.2f} {int(best['epoch']):10d} "
              f"{best['val_perplexity']:9.3f}")


if __name__ == "__main__":
    main()
