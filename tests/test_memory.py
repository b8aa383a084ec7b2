"""release_freed_memory: what a thread freed leaves the process's resident memory."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Run in a fresh interpreter: resident memory is the whole process's, and a test worker's other
# threads (a Prefect or Dask client left by an earlier test) allocate meanwhile.
CHURN = """
import json, threading
from pathlib import Path
import numpy as np
from seqlm.threads import release_freed_memory

def resident_mb():
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20

# Arrays of 1-8 MB, as the n-gram tasks make them: after glibc has raised its mmap threshold
# (it does once such a block is freed), they come from the thread's heap, and freeing them
# leaves the heap's pages resident.
def churn():
    held = [np.ones((1 + i % 8) << 17) for i in range(400)]      # ~1.8 GB written
    del held[::2]
    held.clear()

np.ones(8 << 17)                         # a freed mmapped block: the threshold goes up
before = resident_mb()
worker = threading.Thread(target=churn)
worker.start()
worker.join()
kept = resident_mb() - before
release_freed_memory()
print(json.dumps({"kept": kept, "after": resident_mb() - before}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_memory_a_thread_freed_goes_back_to_the_kernel() -> None:
    run = subprocess.run([sys.executable, "-c", CHURN], capture_output=True, text=True,
                         check=True)
    mb = json.loads(run.stdout)
    assert mb["kept"] > 200, mb            # glibc kept it: the case the function is for
    assert mb["after"] < 100, mb
