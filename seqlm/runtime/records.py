"""The one record of which stage is up to date: Prefect's task cache, read by every entry point.

A stage task is cached under a key of what it reads, the same inputs DVC hashes (its params, the
contents of its data and code). The result Prefect persists under that key is the stage's record:
plain JSON holding the digest of the outputs it wrote and what it measured. A record is valid
while the outputs on disk are still those: outputs deleted, edited, or written since by a run with
other inputs make the stage run again (`StageCache.compute_key` drops such a record). `seqlm
run`, a Prefect worker, Dask workers (on the shared workspace) and `seqlm stage` under `dvc repro`
(`run_alone`) all read and write the same records, in `RECORDS` inside the workspace.

Records are read only as plain JSON (`StageRecords`, `SERIALIZER`): a file planted in their
folder, a pickle for instance, is no record, and nothing in it runs.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.filesystems import LocalFileSystem, WritableFileSystem
from prefect.results import ResultStore
from prefect.serializers import JSONSerializer

from seqlm.io import file_digest
from seqlm.params import Params
from seqlm.stages import STAGE_BY_NAME, Stage

RECORDS = Path(".seqlm/records")   # relative to the workspace root, like every stage path
VALUES = RECORDS / "values"        # the records' values; RECORDS holds their metadata
# Plain JSON both ways: no decoder that imports a class by name, and an encoder that writes
# only what a failed stage leaves (Prefect persists the exception of a failed task run, under a
# key of its own): its type and message, as plain data.
SERIALIZER = JSONSerializer(object_encoder="seqlm.runtime.records.plain_error",
                            object_decoder=None)
Record = dict[str, Any]


def plain_error(value: Any) -> dict[str, str]:
    """JSON of an exception: {"error": its type, "message": its text}; nothing else encodes."""
    if isinstance(value, BaseException):
        return {"error": type(value).__name__, "message": str(value)}
    raise TypeError(f"a stage record holds plain JSON only, not {type(value).__name__}")
log = logging.getLogger(__name__)


def content_digest(path: Path) -> str:
    """sha256 over a file, or over every file of a folder with its relative path; files and
    folders whose names start with a dot (leftovers of an interrupted write) are left out."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        inner = file.relative_to(path) if path.is_dir() else Path(file.name)
        if any(part.startswith(".") for part in inner.parts):
            continue
        digest.update(str(inner).encode())
        digest.update(file_digest(file).encode())
    return digest.hexdigest()


def _paths_digest(paths: list[str], seed: str = "") -> str:
    digest = hashlib.sha256(seed.encode())
    for name in paths:
        path = Path(name)
        digest.update(f"|{name}:{content_digest(path) if path.exists() else 'missing'}".encode())
    return digest.hexdigest()


def cache_key(stage: Stage, params: Params, item: str | None) -> str:
    """What DVC compares before running a stage: its params and the contents of what it reads."""
    paths = stage.at(params, item)
    inputs = _paths_digest([*paths.deps.values(), *paths.code],
                           f"{stage.name}|{item}|{params.digest(list(stage.params))}")
    return f"{stage.label(item)}-{inputs[:32]}"


def outputs_digest(stage: Stage, params: Params, item: str | None) -> str:
    return _paths_digest(stage.at(params, item).written())


class StageRecords(WritableFileSystem):
    """The records' metadata, as the key storage of Prefect's cache (the values are in VALUES,
    Prefect's result storage). Prefect asks here whether a record exists and how to decode its
    value: a read answers only for metadata that names the plain JSON serializer and a value
    that is plain JSON (anything else reads as absent, so Prefect runs the stage and writes a
    proper record); writes are atomic."""

    _block_type_name = "seqlm stage records"
    basepath: str = str(RECORDS)

    def _resolve_path(self, path: str) -> Path:
        base = Path(self.basepath).resolve()
        resolved = Path(path) if Path(path).is_absolute() else base / path
        if resolved.parent != base or resolved.name.startswith("."):
            raise ValueError(f"{path!r}: not a record in {self.basepath}")
        return resolved

    def read_path(self, path: str, **_: Any) -> bytes | None:
        try:
            content = self._resolve_path(path).read_bytes()
        except (OSError, ValueError):
            return None
        return content if _value_of(content) is not None else None

    def write_path(self, path: str, content: bytes, **_: Any) -> str:
        target = self._resolve_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        os.replace(tmp, target)
        return str(target)

    def drop(self, key: str) -> None:
        self._resolve_path(key).unlink(missing_ok=True)
        (VALUES / key).unlink(missing_ok=True)


METADATA = StageRecords()


def _value_of(metadata: bytes) -> Record | None:
    """The value a record's metadata points to, when both are the plain data this module
    writes; otherwise None (another serializer, a pickle, a value outside VALUES)."""
    try:
        meta = json.loads(metadata)
        if meta["serializer"] != SERIALIZER.model_dump(mode="json"):
            return None
        value_path = Path(meta["storage_key"])
        if value_path.parent != VALUES.resolve():
            return None
        value = json.loads(value_path.read_bytes())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, dict) and _plain(value) else None


def _plain(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def read_record(key: str) -> Record | None:
    """The stage record under `key`, if there is a valid one."""
    try:
        return _value_of(METADATA._resolve_path(key).read_bytes())
    except (OSError, ValueError):
        return None


def fetches_every_run(stage: Stage, params: Params) -> bool:
    """A download without a checksum reads a source that may change: it runs every time, and
    the stages after it run again only when the content it fetched changed."""
    return stage.name == "download" and params.download.checksum is None


def still_valid(record: Record, stage: Stage, params: Params, item: str | None) -> bool:
    """Whether a stage's record stands for the workspace: its outputs are on disk as it wrote
    them, and its MLflow logging (for a training) went through."""
    return (not fetches_every_run(stage, params) and record.get("tracked") is not False
            and record.get("outputs") == outputs_digest(stage, params, item))


def up_to_date(stage: Stage, params: Params, item: str | None = None) -> bool:
    """Whether the stage has a record that stands for the workspace: its task would be Cached."""
    record = read_record(cache_key(stage, params, item))
    return record is not None and still_valid(record, stage, params, item)


@dataclass
class StageCache(CachePolicy):
    """Prefect's cache for one stage: the key of what it reads; a record that no longer stands
    for the outputs on disk is dropped first, so that the stage runs and records anew (a cache
    policy cannot ask Prefect to overwrite a record, only name it)."""

    stage_name: str = ""
    item_arg: str | None = None            # the task argument naming the foreach item

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any],
                    flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        stage, params = STAGE_BY_NAME[self.stage_name], inputs["params"]
        item = inputs.get(self.item_arg) if self.item_arg else None
        key = cache_key(stage, params, item)
        record = read_record(key)
        if record is not None and not still_valid(record, stage, params, item):
            METADATA.drop(key)
        return key


def stage_task(name: str, **options: Any) -> Callable[[Callable[..., Record]], Task]:
    """The Prefect task of stage `name`: the decorated body reads its inputs, writes its outputs
    and returns what it measured (plain data); the task returns that with the digest of the
    outputs, which Prefect persists as the stage's record. The body's first argument is the
    params, its second (for a foreach stage) the item."""
    stage = STAGE_BY_NAME[name]

    def decorate(body: Callable[..., Record]) -> Task:
        signature = inspect.signature(body)
        item_arg = list(signature.parameters)[1] if stage.foreach else None

        @functools.wraps(body)
        def run(*args: Any, **kwargs: Any) -> Record:
            arguments = signature.bind(*args, **kwargs).arguments
            params, item = arguments["params"], arguments.get(item_arg) if item_arg else None
            inputs = cache_key(stage, params, item)      # the record's key: what it was made of
            measured = body(*args, **kwargs)
            return {"stage": stage.label(item), **(measured or {}), "inputs": inputs,
                    "outputs": outputs_digest(stage, params, item)}
        return task(run, name=name, cache_policy=StageCache(key_storage=METADATA, stage_name=name,
                                                         item_arg=item_arg),
                    persist_result=True, result_storage=VALUES, result_serializer=SERIALIZER,
                    **options)
    return decorate


def run_alone(stage_task_: Task, params: Params, item: str | None = None) -> Record:
    """Run a stage outside a flow (`seqlm stage`, what `dvc repro` calls) and write the record
    Prefect's engine would write, so that the next flow run knows the stage is up to date."""
    args = (params, item) if item is not None else (params,)
    stage = STAGE_BY_NAME[stage_task_.name]
    key = cache_key(stage, params, item)
    if stage_task_.retries:          # retries are the engine's: run it through Prefect
        return stage_task_(*args)
    record = stage_task_.fn(*args)
    store = ResultStore(result_storage=LocalFileSystem(basepath=str(VALUES)),
                        metadata_storage=METADATA, serializer=SERIALIZER)
    store.write(obj=record, key=key)
    return record
