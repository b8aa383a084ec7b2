"""release_freed_memory: what a thread freed leaves the process's resident memory."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from seqlm.threads import release_freed_memory


def resident_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_memory_a_thread_freed_goes_back_to_the_kernel() -> None:
    # Arrays of 1-8 MB, as the n-gram tasks make them: after glibc has raised its mmap
    # threshold (it does once such a block is freed), they come from the thread's heap, and
    # freeing them leaves the heap's pages resident.
    def churn() -> None:
        held = [np.ones((1 + i % 8) << 17) for i in range(400)]    # ~1.8 GB written
        del held[::2]
        held.clear()
    np.ones(8 << 17)                     # a freed mmapped block: the threshold goes up
    before = resident_mb()
    worker = threading.Thread(target=churn)
    worker.start()
    worker.join()
    kept = resident_mb() - before
    release_freed_memory()
    assert resident_mb() - before < min(100, kept / 4), (kept, resident_mb() - before)
