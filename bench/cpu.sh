#!/usr/bin/env bash
# The CPU benchmark suite (see bench/README.md), results into bench/results/. Run it on an idle
# machine: the figures are wall times. About 20 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
tag=${TAG:-cpu-$(nproc)core}
stamp() { echo "# $1, $(date -I); machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"; }
{ stamp "bench/train_speed.py --epochs 5 (torch's threads, then one thread: a training of the pipeline's)"
  "$python" bench/train_speed.py --epochs 5; "$python" bench/train_speed.py --epochs 5 --threads 1; } \
  | tee "bench/results/train_speed-$tag.txt"
{ stamp "bench/main_job.py"; "$python" bench/main_job.py; } | tee "bench/results/main_job-$tag.txt"
"$python" bench/ngrams.py --size 100MB --max-n 5 --out "bench/results/ngrams-$tag.txt"
