"""The `seqlm` command's process."""
from __future__ import annotations

import subprocess
import sys

# A cycle with a finalizer, left for the collector: the interpreter's final collections would
# finalize it, and print.
SCRIPT = """
import seqlm.cli

class Node:
    def __del__(self):
        print("collected at exit")

node = Node()
node.self = node
del node
"""


def test_the_exit_does_not_walk_the_heap_again():
    """The final collections of a process that imported the CLI skip what was alive at exit
    (gc.freeze as the last exit handler): torch's, MLflow's and Prefect's heaps took 1.7 s of a
    9-second re-run with nothing changed."""
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            check=True)
    assert "collected at exit" not in result.stdout
    # The same script without the CLI: the check itself can see a final collection.
    plain = subprocess.run([sys.executable, "-c", SCRIPT.replace("import seqlm.cli", "")],
                           capture_output=True, text=True, check=True)
    assert "collected at exit" in plain.stdout


def test_seqlm_stage_names_a_missing_or_extra_item(workdir):
    from typer.testing import CliRunner
    from seqlm.cli import app
    missing = CliRunner().invoke(app, ["stage", "train_lm"])
    assert missing.exit_code == 2 and "stage train_lm needs an item: one of train_lm.models" in \
        missing.output
    extra = CliRunner().invoke(app, ["stage", "sine", "rnn"])
    assert extra.exit_code == 2 and "stage sine takes no item, got 'rnn'" in extra.output
    unknown = CliRunner().invoke(app, ["stage", "train"])
    assert unknown.exit_code == 2 and "unknown stage 'train'" in unknown.output
