"""The stages' record (seqlm.runtime.records): Prefect's cache of a stage task, read as plain JSON
only. A planted file, a pickle that would run a command for instance, is no record: the stage
runs again and nothing in the file runs."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from prefect import flow

from seqlm.params import load_params
from seqlm.runtime.records import METADATA, RECORDS, VALUES, cache_key, read_record
from seqlm.stages import STAGE_BY_NAME
from tasks.sine import sine


@flow
def sine_once(params_file: str) -> str:
    future = sine.submit(load_params(params_file))
    future.wait()
    return future.state.name


class Touch:
    """Unpickling this runs `touch <path>`: what a planted record would do if it were loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.path}",)


def key() -> str:
    return cache_key(STAGE_BY_NAME["sine"], load_params(), None)


def test_a_stage_is_cached_on_its_plain_json_record(workdir, prefect_server):
    assert sine_once("params.yaml") == "Completed"
    record = read_record(key())
    assert record["stage"] == "sine" and len(record["outputs"]) == 64
    meta = json.loads((RECORDS / key()).read_text())
    assert meta["serializer"]["type"] == "json" and meta["serializer"]["object_decoder"] is None
    assert json.loads((VALUES / key()).read_text()) == record
    assert sine_once("params.yaml") == "Cached"


@pytest.mark.parametrize("plant", ["value", "metadata", "both"])
def test_a_planted_pickle_is_no_record_and_does_not_run(workdir, prefect_server, plant):
    assert sine_once("params.yaml") == "Completed"
    touched = workdir / "touched"
    payload = pickle.dumps(Touch(touched))
    meta = json.loads((RECORDS / key()).read_text())
    if plant in ("metadata", "both"):     # the serializer Prefect would decode the value with
        meta["serializer"] = {"type": "pickle", "picklelib": "pickle"}
        (RECORDS / key()).write_text(json.dumps(meta))
    if plant in ("value", "both"):
        (VALUES / key()).write_bytes(payload)
    assert read_record(key()) is None
    assert sine_once("params.yaml") == "Completed"        # run again, recorded anew
    assert not touched.exists()
    assert read_record(key())["stage"] == "sine"


def test_a_record_that_is_not_the_projects_reads_as_absent(workdir):
    (RECORDS).mkdir(parents=True)
    for content in (b"", b"not json", b'{"serializer": {"type": "json"}}', pickle.dumps({"a": 1})):
        (RECORDS / "x").write_bytes(content)
        assert read_record("x") is None and METADATA.read_path("x") is None
    assert METADATA.read_path("../params.yaml") is None        # only files of its folder
