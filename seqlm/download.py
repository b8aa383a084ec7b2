"""Fetch one file from the first of several sources that delivers it intact.

Every attempt streams into a temporary file beside the output, hashing as it writes, and is
renamed over the output only when the checksum matches: a mismatch or a dropped connection
never replaces a good file and never leaves a temporary one behind.
"""
from __future__ import annotations

import hashlib
import logging
import os
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO, NamedTuple
from urllib.parse import urlparse
from urllib.request import url2pathname

import httpx
from tqdm import tqdm

from seqlm.io import atomic_path, file_digest
from seqlm.params import DownloadParams

CHUNK = 1 << 16
# Server-side trouble that a later attempt may not meet again; other statuses (404, 403) are final.
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})

Logger = logging.Logger | logging.LoggerAdapter


class SourceError(Exception):
    """One source could not deliver the file. `network`: the failure may go away on a retry."""

    def __init__(self, reason: str, network: bool = False):
        super().__init__(reason, network)  # args = constructor args, so it survives pickling
        self.reason, self.network = reason, network

    def __str__(self) -> str:
        return self.reason


class Failure(NamedTuple):
    source: str
    reason: str
    network: bool


class AllSourcesFailed(RuntimeError):
    """No source delivered the file; the message lists every source and why it failed."""

    def __init__(self, out: str, failures: tuple[Failure, ...]):
        super().__init__(out, failures)
        self.out, self.failures = out, failures

    @property
    def retriable(self) -> bool:
        """True when some source failed for a network reason, so a later attempt may succeed."""
        return any(f.network for f in self.failures)

    def __repr__(self) -> str:  # what Prefect logs on a retry: the message, not the tuples
        return f"{type(self).__name__}({str(self)!r})"

    def __str__(self) -> str:
        n = len(self.failures)
        which = "the only source" if n == 1 else f"all {n} sources"
        listed = "; ".join(f"{f.source}: {f.reason}" for f in self.failures)
        return f"{which} failed for {self.out}: {listed}"


def ensure_file(p: DownloadParams, log: Logger = logging.getLogger(__name__),
                check: Callable[[Path, str], None] | None = None) -> bool:
    """Make `p.out` the file whose digest is `p.checksum`, trying `p.sources` in order, and
    record its sha256 beside it (`<out>.sha256`, the format `sha256sum -c` reads).

    `check(fetched, source)` judges the content before it replaces `p.out`: a ValueError
    makes that source a failure (the next one is tried) and keeps the previous file.

    Without a checksum the source may change: it is fetched every time and the content's sha256
    is recorded. Returns False when a matching file was already there (nothing fetched), True
    after a fetch. Raises AllSourcesFailed when no source delivers it.
    """
    out = Path(p.out)
    if p.checksum is not None and out.is_file():
        digest = file_digest(out, p.algorithm)
        if digest == p.checksum:
            log.info("%s is cached (%s %s); not fetching", out, p.algorithm, digest)
            write_checksum_file(out)
            return False
        log.warning("%s has %s %s, expected %s; fetching it again", out, p.algorithm, digest,
                    p.checksum)
    previous = file_digest(out, "sha256") if out.is_file() else None
    failures: list[Failure] = []
    for source in p.sources:
        try:
            with atomic_path(out) as tmp:
                digest = _copy(source, tmp, p)
                if p.checksum is not None and digest != p.checksum:
                    raise SourceError(
                        f"checksum mismatch ({p.algorithm} {digest}, expected {p.checksum})")
                if check is not None:
                    try:
                        check(tmp, source)
                    except ValueError as exc:
                        raise SourceError(f"unusable content: {exc}") from None
        except SourceError as exc:
            log.warning("%s: %s", source, exc.reason)
            failures.append(Failure(source, exc.reason, exc.network))
        else:
            sha256 = write_checksum_file(out)
            change = ("" if p.checksum is not None else
                      "; unchanged since the last fetch" if sha256 == previous else
                      f"; new content (was sha256 {previous})" if previous else "")
            log.info("fetched %s from %s (%s %s%s)", out, source, p.algorithm, digest, change)
            return True
    raise AllSourcesFailed(str(out), tuple(failures))


def checksum_file(out: Path | str) -> Path:
    out = Path(out)
    return out.with_name(f"{out.name}.sha256")


def write_checksum_file(out: Path) -> str:
    """Write `<out>.sha256` for `out` (atomically; only when it changes); return the sha256."""
    sha256 = file_digest(out, "sha256")
    line = f"{sha256}  {out.name}\n"
    record = checksum_file(out)
    if not record.is_file() or record.read_text(encoding="utf-8") != line:
        with atomic_path(record) as tmp:
            tmp.write_text(line, encoding="utf-8")
    return sha256


def _copy(source: str, dest: Path, p: DownloadParams) -> str:
    """Stream `source` into `dest`; return the hex digest of what was written."""
    if "://" not in source:
        return _copy_local(Path(source), dest, p.algorithm, source)
    url = urlparse(source)
    if url.scheme in ("http", "https"):
        return _copy_http(source, dest, p)
    if url.scheme == "file" and url.netloc in ("", "localhost"):
        return _copy_local(Path(url2pathname(url.path)), dest, p.algorithm, source)
    raise SourceError("unsupported URL (use https://, http://, file:/// or a local path)")


def _copy_local(path: Path, dest: Path, algorithm: str, label: str) -> str:
    try:
        src = open(path, "rb")
    except OSError as exc:
        raise SourceError(exc.strerror or str(exc)) from None
    with src, open(dest, "wb") as dst:
        chunks = iter(lambda: src.read(CHUNK), b"")
        return _stream(chunks, dst, algorithm, os.fstat(src.fileno()).st_size, label, bar=False)


def _copy_http(url: str, dest: Path, p: DownloadParams) -> str:
    # The read timeout bounds each wait for data, not the whole transfer.
    timeout = httpx.Timeout(p.read_timeout_s, connect=p.connect_timeout_s)
    # identity: the bytes hashed and counted are the bytes served, Content-Length included.
    headers = {"Accept-Encoding": "identity"}
    try:
        with httpx.stream("GET", url, headers=headers, timeout=timeout,
                          follow_redirects=True) as response:
            if not response.is_success:
                raise SourceError(f"HTTP {response.status_code} {response.reason_phrase}".strip(),
                                  network=response.status_code in TRANSIENT_STATUS)
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with open(dest, "wb") as dst:
                # h11 raises RemoteProtocolError when the body ends short of Content-Length.
                return _stream(response.iter_bytes(CHUNK), dst, p.algorithm, total, url)
    except httpx.TransportError as exc:  # refused, reset, DNS, timeouts, dropped mid-body
        raise SourceError(_describe(exc), network=not _bad_certificate(exc)) from None
    except httpx.HTTPError as exc:  # too many redirects and the like: retrying will not help
        raise SourceError(_describe(exc)) from None


def _bad_certificate(exc: BaseException | None) -> bool:
    # httpx reports a certificate that does not verify as a ConnectError; it will not verify
    # on a retry either.
    while exc is not None:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _describe(exc: Exception) -> str:
    detail = " ".join(str(exc).split())  # one line
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _stream(chunks: Iterable[bytes], dst: BinaryIO, algorithm: str, total: int | None,
            label: str, bar: bool = True) -> str:
    """Copy and hash; a progress bar in bytes for downloads (not for a local copy, which is
    instant), and only in a terminal."""
    digest = hashlib.new(algorithm)
    with tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
              disable=None if bar else True) as bar:
        for chunk in chunks:
            dst.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()
