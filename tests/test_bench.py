"""The benchmark scripts that need a machine this suite does not have still run here."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO


def test_gpu_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu.sh")], check=True)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_gpu_script_falls_back_to_the_cpu(tmp_path: Path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh")], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no CUDA GPU: running the CPU fallback" in result.stdout
    training = (tmp_path / "gpu-training-cpu.txt").read_text()
    speed = (tmp_path / "gpu-train-speed-cpu.txt").read_text()
    assert "rnn_scratch" in training and "rnn " in training
    assert all(model in speed for model in ("rnn_scratch", "rnn", "gru", "lstm"))
    assert speed.count("x\n") == 4                      # a ratio per model


def test_a_main_only_reference_run_keeps_the_full_corpus_section(tmp_path: Path):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from reference import previous_full_corpus
    finally:
        sys.path.remove(str(REPO / "bench"))
    old = tmp_path / "reference.md"
    old.write_text("# Reference results\n\nMeasured 2026-11-28 by `python bench/reference.py` on a "
                   "fresh clone (commit abc1234); machine: 2 cores.\n\n### The main job (`x`)\n\n"
                   "Set-up 1 s.\n\n| a |\n\n### The whole corpus (`y`)\n\n2100 s wall.\n\n"
                   "| lstm |\n")
    kept = previous_full_corpus(old)
    assert kept == ("\n### The whole corpus (`y`)\n\nMeasured 2026-11-28 by `python "
                    "bench/reference.py` on a fresh clone (commit abc1234). 2100 s wall.\n\n"
                    "| lstm |\n")
    # a file where the machine was named once for both sections: the kept one names it
    old.write_text(f"# Reference results\n\nMachine: 2 cores.\n\n### The main job (`x`)\n\n{kept}")
    named = kept.replace("(commit abc1234). 2100", "(commit abc1234), on 2 cores. 2100")
    assert previous_full_corpus(old) == named
    old.write_text(f"# Reference results\n\n### The main job (`x`)\n\nMeasured ...\n\n{named}")
    assert previous_full_corpus(old) == named           # the current layout is kept as it is
    assert previous_full_corpus(tmp_path / "absent.md") == ""
