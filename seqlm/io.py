"""Atomic writes: an artifact is either the old complete file or the new complete one, and a
stage's outputs are published all together or not at all (`publish`). A write that fails for
want of space or permission names the artifact and says so (StorageError)."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


class StorageError(OSError):
    """Writing an artifact failed (no space, no permission, ...); the previous one is kept."""

    def __init__(self, path: Path, what: str, code: int | None) -> None:
        super().__init__(code, f"{path}: {what}; the previous version is kept")
        self.filename, self.what = str(path), what

    def __str__(self) -> str:
        return self.strerror


def _storage_error(path: Path, exc: OSError) -> StorageError:
    if isinstance(exc, StorageError):
        return StorageError(path, exc.what, exc.errno)
    # numpy reports a short write as "N requested and M written", without an errno.
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) or (
            exc.errno is None and "requested and" in str(exc)):
        what = "no space left on the device"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = f"not allowed to write there ({exc.strerror})"
    else:
        what = exc.strerror or " ".join(str(exc).split())
    return StorageError(path, what, exc.errno)


def _chmod_like_open(path: Path) -> None:
    """mkstemp/mkdtemp create 0600/0700; give the artifact the mode a plain open() would have."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _storage_error(path, exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _chmod_like_open(tmp_path)
        os.replace(tmp_path, path)
    except OSError as exc:
        raise _storage_error(path, exc) from None
    finally:
        tmp_path.unlink(missing_ok=True)


class Publication:
    """Outputs being written for one stage: `file(target)` and `folder(target)` give temporary
    places beside the targets; `publish` moves them all into place once every write worked."""

    def __init__(self) -> None:
        self.staged: list[tuple[Path, Path]] = []       # (temporary, target)

    def file(self, target: Path | str) -> Path:
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        self.staged.append((Path(tmp), target))
        return Path(tmp)

    def folder(self, target: Path | str) -> Path:
        """An empty folder that replaces `target` as a whole: files of the old one not written
        again are gone."""
        target = Path(target)
        _recover(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        self.staged.append((tmp, target))
        return tmp


@contextlib.contextmanager
def publish() -> Iterator[Publication]:
    """All of a stage's outputs or none: everything is written to temporary places first (a
    failing write leaves every previous output as it was), then renamed into place."""
    outputs = Publication()
    try:
        yield outputs
        for tmp, target in outputs.staged:
            _chmod_like_open(tmp)
        for tmp, target in outputs.staged:
            if tmp.is_dir():
                _swap_folder(tmp, target)
            else:
                os.replace(tmp, target)
    except OSError as exc:
        raise _storage_error(_target_of(exc.filename, outputs.staged), exc) from None
    finally:
        for tmp, _target in outputs.staged:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _target_of(filename: str | None, staged: list[tuple[Path, Path]]) -> Path:
    """The artifact a temporary path stands for: what an error message should name."""
    path = Path(filename or "?")
    for tmp, target in staged:
        if path == tmp:
            return target
        if path.is_relative_to(tmp):
            return target / path.relative_to(tmp)
    return path


def _swap_folder(new: Path, target: Path) -> None:
    """Replace folder `target` by `new`: two renames; a crash between them leaves the old
    folder as `.<name>.old`, which _recover puts back."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _recover(target: Path) -> None:
    old = target.with_name(f".{target.name}.old")
    if old.is_dir() and not target.exists():
        os.replace(old, target)


@contextlib.contextmanager
def atomic_open(path: Path | str, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle


def write_json(path: Path | str, data: object) -> Path:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, allow_nan=False)  # valid JSON or an error
        handle.write("\n")
    return Path(path)


def write_csv(path: Path | str, frame: Any) -> Path:
    """A pandas DataFrame as CSV without the index."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        frame.to_csv(handle, index=False)
    return Path(path)


def save_torch(path: Path | str, obj: Any) -> Path:
    """torch.save, atomically and byte-reproducibly: saved through a file object, the archive's
    inner folder is always named "archive", not after the (random) temporary file name. It is
    serialised in memory first, so that a full disk is an OSError of the write (torch reports
    its own short writes as an opaque RuntimeError)."""
    import torch
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_open(path, "wb") as handle:
        handle.write(buffer.getbuffer())
    return Path(path)


def file_digest(path: Path | str, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
