#!/usr/bin/env bash
# The GPU benchmarks, in ONE call on a machine with an NVIDIA GPU and a python3 that holds
# torch (the device machines here have no network: pydantic, which seqlm.params needs, travels
# as wheels in .whl/, fetched beforehand with bench/gpu-wheels.sh).
#   1. the main job's trainings on CUDA (the chapter's 500 epochs, best-epoch kept), then
#   2. the seed's train_ch8 loop vs this project's loop for rnn_scratch, rnn, gru and lstm,
#      side by side on the same GPU: tokens/s and ratios, then
#   3. the raw-text experiment (experiments/shakespeare.yaml) by steps with a GPU's batch.
# Results go to $OUT (the device tool's output folder), else bench/results/.
# Without a GPU it runs the same scripts on the CPU with few epochs (a check that it works).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
python=${PYTHON:-python3}
if [ -d .whl ]; then
  "$python" -m pip install --quiet --no-index --find-links .whl pydantic
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  device=cuda; epochs=(); speed_epochs=20
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu-machine.txt"
else
  echo "no CUDA GPU: running the CPU fallback with few epochs"
  device=cpu; epochs=(--epochs 2); speed_epochs=1
fi
"$python" bench/gpu_training.py --device "$device" "${epochs[@]}" | tee "$out/gpu-training-$device.txt"
"$python" bench/train_speed.py --device "$device" --epochs "$speed_epochs" \
  --models rnn_scratch rnn gru lstm | tee "$out/gpu-train-speed-$device.txt"
# 3. the raw-text experiment (tinyshakespeare, every character) by steps on the same device: a
#    batch that fills the card, a larger LSTM (TF32 and cuDNN on CUDA); nats/char per evaluation
#    with the training time it was reached at (target on a GPU: <= 1.40 within 3 minutes).
if [ "$device" = cuda ]; then
  shakespeare=(--set train_lm.batch_size=128 --set train_lm.num_steps=256 --set train_lm.hidden=1024
               --set train_lm.num_layers=2 --set train_lm.dropout=0.25 --set train_lm.embedding=128
               --set train_lm.max_steps=3000 --set train_lm.eval_every=250)
else
  shakespeare=(--set train_lm.max_steps=20 --set train_lm.eval_every=10 --set train_lm.warmup_steps=5
               --set train_lm.hidden=64)
fi
"$python" bench/gpu_training.py --device "$device" --params experiments/shakespeare.yaml \
  "${shakespeare[@]}" | tee "$out/gpu-shakespeare-$device.txt"
