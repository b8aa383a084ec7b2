"""Atomic writes and whole-stage publication: all outputs or none, errors that name the file."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

import seqlm.io
from seqlm.io import StorageError, publish, write_json


def test_publish_writes_everything_or_nothing(tmp_path: Path, monkeypatch) -> None:
    out, report = tmp_path / "models" / "m", tmp_path / "reports" / "m.json"
    with publish() as outputs:
        folder = outputs.folder(out)
        (folder / "a.txt").write_text("old a")
        (folder / "b.txt").write_text("old b")
        write_json(outputs.file(report), {"v": 1})
    before = {p.name: p.read_text() for p in out.iterdir()}, report.read_text()
    writes = []
    real_replace = os.replace

    def failing_replace(src, dst):                 # the third write of the stage fails
        writes.append(dst)
        if len(writes) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(src))
        return real_replace(src, dst)
    monkeypatch.setattr(seqlm.io.os, "replace", failing_replace)
    with pytest.raises(StorageError, match=r"models/m/c.txt: no space left on the device; "
                                           "the previous version is kept$"):
        with publish() as outputs:
            folder = outputs.folder(out)
            write_json(folder / "a.json", {"new": 1})
            write_json(outputs.file(report), {"v": 2})
            write_json(folder / "c.txt", {"new": 3})
    monkeypatch.undo()
    assert ({p.name: p.read_text() for p in out.iterdir()}, report.read_text()) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"]              # no leftovers
    assert sorted(p.name for p in report.parent.iterdir()) == ["m.json"]
    # a clean publication replaces the folder as a whole: files not written again are gone
    with publish() as outputs:
        (outputs.folder(out) / "only.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["only.txt"]


def test_a_swap_cut_between_its_two_renames_is_recovered(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.with_name(".data.old").mkdir()
    (out.with_name(".data.old") / "kept.txt").write_text("previous")
    with pytest.raises(RuntimeError):
        with publish() as outputs:
            outputs.folder(out)             # finds the old folder and puts it back first
            raise RuntimeError("the stage failed")
    assert (out / "kept.txt").read_text() == "previous"


def test_storage_errors_name_the_file_and_the_cause(tmp_path: Path) -> None:
    full = seqlm.io._storage_error(Path("data/x.npy"), OSError("170580 requested and 102368 written"))
    assert str(full) == "data/x.npy: no space left on the device; the previous version is kept"
    denied = seqlm.io._storage_error(Path("m.pt"), PermissionError(errno.EACCES, "Permission denied"))
    assert str(denied) == "m.pt: not allowed to write there (Permission denied); the previous " \
                          "version is kept"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() != 0:                   # root writes anyway
        with pytest.raises(StorageError, match="not allowed to write there"):
            write_json(locked / "x.json", {})
    np.save(tmp_path / "ok.npy", np.arange(3))   # the happy path is untouched
