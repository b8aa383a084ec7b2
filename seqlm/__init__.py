"""Sequence models of D2L chapter 8 as a reproducible pipeline: library code shared by the tasks."""
import logging

# Prefect gives the loggers of `[logging] extra_loggers` (prefect.toml: `seqlm`) its handlers,
# not a level: without this their INFO lines (training progress, checkpoints, champion
# decisions) are dropped, in `seqlm run` and in a Prefect worker alike.
logging.getLogger("seqlm").setLevel(logging.INFO)
