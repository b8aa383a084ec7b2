"""download: a real HTTP server on 127.0.0.1, local mirrors, and Prefect retries on the test server."""
from __future__ import annotations

import collections
import contextlib
import datetime
import hashlib
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prefect import flow

from seqlm.download import AllSourcesFailed
from seqlm.params import Params, load_params
from seqlm.runtime.records import outputs_digest
from seqlm.stages import STAGE_BY_NAME
from tasks.download import configured_download, download
from conftest import write_params

OUT = Path("data/raw/timemachine.txt")
SHA256 = Path("data/raw/timemachine.txt.sha256")
OUTS = [OUT, SHA256]
MIRROR = Path("data/mirror/timemachine.txt")


def written(record: dict) -> list[Path]:
    """The files a download's record stands for: its digest is that of OUTS on disk."""
    assert record["stage"] == "download"
    assert record["outputs"] == outputs_digest(STAGE_BY_NAME["download"], load_params(), None)
    return OUTS


class Drop(bytes):
    """A response that promises these bytes in Content-Length, sends half, then hangs up."""


class Server:
    """Serves planned responses per path: bytes (200), an int (that status) or Drop(bytes).
    Each request takes the next response of its path's plan; the last one repeats."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.plans: dict[str, list[bytes | int]] = {}
        self.hits: collections.Counter[str] = collections.Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits[self.path] += 1
                plan = server.plans.get(self.path, [404])
                response = plan.pop(0) if len(plan) > 1 else plan[0]
                if isinstance(response, int):
                    self.send_error(response)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(response)))
                self.end_headers()
                if isinstance(response, Drop):
                    self.wfile.write(response[: len(response) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                else:
                    self.wfile.write(response)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.scheme = "https" if tls else "http"
        if tls:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_port}{path}"

    @contextlib.contextmanager
    def running(self) -> Iterator[Server]:
        thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.httpd.shutdown()
            self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    with Server().running() as srv:
        yield srv


def self_signed_tls(folder: Path) -> ssl.SSLContext:
    """A server TLS context with a fresh self-signed certificate for 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    pem = folder / "server.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pem)
    return context


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/timemachine.txt"


def params_with(root: Path, **download: object) -> Params:
    write_params(root, download=download)
    return load_params()


def leftovers(folder: Path) -> list[str]:
    """Files in `folder` other than the outputs: temp files that should not be there."""
    names = {out.name for out in OUTS}
    return sorted(p.name for p in folder.iterdir() if p.name not in names) if folder.exists() else []


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def test_http_fetch_then_cached(workdir: Path, server: Server) -> None:
    corpus = MIRROR.read_bytes()
    server.plans["/tm.txt"] = [corpus]
    params = params_with(workdir, sources=[server.url("/tm.txt")])

    assert written(download.fn(params)) == OUTS
    assert OUT.read_bytes() == corpus
    assert sha1(OUT.read_bytes()) == params.download.checksum
    # the record beside it is what `sha256sum -c` reads
    assert SHA256.read_text() == f"{hashlib.sha256(corpus).hexdigest()}  timemachine.txt\n"
    mtime = OUT.stat().st_mtime_ns

    assert written(download.fn(params)) == OUTS
    assert server.hits["/tm.txt"] == 1  # the cached file was not fetched again
    assert OUT.stat().st_mtime_ns == mtime
    assert leftovers(OUT.parent) == []


def test_good_cached_file_is_not_touched(workdir: Path) -> None:
    OUT.parent.mkdir(parents=True)
    OUT.write_bytes(MIRROR.read_bytes())
    mtime = OUT.stat().st_mtime_ns
    # The only source is unreachable: success proves nothing was fetched.
    params = params_with(workdir, sources=[closed_port_url()])
    assert written(download.fn(params)) == OUTS
    assert OUT.stat().st_mtime_ns == mtime
    assert leftovers(OUT.parent) == []


def test_without_a_checksum_every_run_fetches_and_records_the_content(
        workdir: Path, server: Server, caplog: pytest.LogCaptureFixture) -> None:
    """A source whose content may change: fetched every time, its sha256 recorded; the file
    changes only when the content does."""
    v1, v2 = MIRROR.read_bytes(), MIRROR.read_bytes() + b"THE END, REVISED\n"
    server.plans["/tm.txt"] = [v1, v1, v2]
    params = params_with(workdir, sources=[server.url("/tm.txt")], checksum=None)
    assert params.download.checksum is None and params.download.algorithm == "sha256"
    records = []
    with caplog.at_level("INFO", logger="seqlm.download"):
        for _ in range(3):
            assert written(download.fn(params)) == OUTS
            records.append((OUT.read_bytes(), SHA256.read_text()))
    assert server.hits["/tm.txt"] == 3
    assert records[0] == records[1] and records[0][0] == v1
    assert records[2] == (v2, f"{hashlib.sha256(v2).hexdigest()}  timemachine.txt\n")
    assert "unchanged since the last fetch" in caplog.text
    assert f"new content (was sha256 {hashlib.sha256(v1).hexdigest()})" in caplog.text
    assert leftovers(OUT.parent) == []


@pytest.mark.parametrize("served, reason", [
    (b"", "corpus is empty"),
    (b"\x00\x01\x02binary" * 50, "corpus is a binary file"),
    ("la machine \xe0 explorer le temps\n".encode("latin-1") * 50, "corpus is not UTF-8"),
    ("\u65f6\u95f4\u673a\u5668\n".encode() * 50, "corpus has no letters"),
    (b"one line of text\n", "preprocess.train_tokens + preprocess.val_tokens = 10000 + 5000 "
                           "exceeds the corpus of 16 tokens"),
])
def test_a_bad_fetch_keeps_the_last_good_corpus(workdir: Path, server: Server, served: bytes,
                                                reason: str) -> None:
    """A source whose content may change serves something preprocess would refuse: the
    previous corpus and its record stay, and the run fails with the reason."""
    good = MIRROR.read_bytes()
    server.plans["/tm.txt"] = [good, served]
    params = params_with(workdir, sources=[server.url("/tm.txt")], checksum=None)
    download.fn(params)
    before = (OUT.read_bytes(), SHA256.read_text())
    with pytest.raises(AllSourcesFailed) as info:
        download.fn(params)
    message = str(info.value)
    assert f"{server.url('/tm.txt')}: unusable content: " in message and reason in message
    assert "\n" not in message and not info.value.retriable
    assert (OUT.read_bytes(), SHA256.read_text()) == before
    assert leftovers(OUT.parent) == []


def test_checksum_mismatch_never_replaces_the_file(workdir: Path, server: Server) -> None:
    OUT.parent.mkdir(parents=True)
    OUT.write_bytes(b"an older, different file\n")
    wrong = b"not the time machine\n" * 100
    server.plans["/tm.txt"] = [wrong]
    params = params_with(workdir, sources=[server.url("/tm.txt")])

    with pytest.raises(AllSourcesFailed) as info:
        download.fn(params)
    message = str(info.value)
    assert f"checksum mismatch (sha1 {sha1(wrong)}, expected {params.download.checksum})" in message
    assert server.url("/tm.txt") in message and "\n" not in message
    assert not info.value.retriable
    assert OUT.read_bytes() == b"an older, different file\n"
    assert leftovers(OUT.parent) == []


def test_dropped_connection_fails_retriably_and_leaves_nothing(workdir: Path,
                                                               server: Server) -> None:
    server.plans["/tm.txt"] = [Drop(MIRROR.read_bytes())]
    params = params_with(workdir, sources=[server.url("/tm.txt")])
    with pytest.raises(AllSourcesFailed, match="RemoteProtocolError") as info:
        download.fn(params)
    assert info.value.retriable
    assert not OUT.exists()
    assert leftovers(OUT.parent) == []


def test_404_then_local_mirror(workdir: Path, server: Server) -> None:
    params = params_with(workdir, sources=[server.url("/missing.txt"), str(MIRROR)])
    assert written(download.fn(params)) == OUTS
    assert server.hits["/missing.txt"] == 1
    assert OUT.read_bytes() == MIRROR.read_bytes()


def test_all_sources_failing_are_listed_in_one_error(workdir: Path, server: Server) -> None:
    refused = closed_port_url()
    sources = [server.url("/missing.txt"), refused, "data/mirror/nowhere.txt"]
    params = params_with(workdir, sources=sources)

    with pytest.raises(AllSourcesFailed) as info:
        download.fn(params)
    message = str(info.value)
    assert message.startswith(f"all 3 sources failed for {OUT}: ")
    assert f"{sources[0]}: HTTP 404 Not Found" in message
    assert f"{refused}: ConnectError" in message
    assert "data/mirror/nowhere.txt: No such file or directory" in message
    assert "\n" not in message
    assert info.value.retriable  # the refused connection may work next time
    assert not OUT.exists()
    assert leftovers(OUT.parent) == []


def test_sha256_and_file_url(workdir: Path) -> None:
    corpus = MIRROR.read_bytes()
    params = params_with(workdir, sources=[MIRROR.resolve().as_uri()],
                         checksum=hashlib.sha256(corpus).hexdigest())
    assert params.download.algorithm == "sha256"
    assert written(download.fn(params)) == OUTS
    assert OUT.read_bytes() == corpus


def test_untrusted_https_certificate_is_a_final_failure(workdir: Path, tmp_path: Path) -> None:
    with Server(tls=self_signed_tls(tmp_path)).running() as srv:
        srv.plans["/tm.txt"] = [MIRROR.read_bytes()]
        params = params_with(workdir, sources=[srv.url("/tm.txt")])
        with pytest.raises(AllSourcesFailed, match="CERTIFICATE_VERIFY_FAILED") as info:
            download.fn(params)
    assert not info.value.retriable  # a retry would meet the same certificate
    assert srv.hits["/tm.txt"] == 0
    assert not OUT.exists()


def test_unsupported_url_scheme(workdir: Path) -> None:
    params = params_with(workdir, sources=["ftp://example.org/timemachine.txt"])
    with pytest.raises(AllSourcesFailed, match="ftp://example.org/timemachine.txt: unsupported URL"):
        download.fn(params)


def run_configured(params: Params) -> list[Path]:
    @flow(name="download-test")
    def download_flow() -> list[Path]:
        return configured_download(params)(params)

    return download_flow()


def test_prefect_retries_a_dropped_connection(prefect_server: None, workdir: Path,
                                              server: Server) -> None:
    corpus = MIRROR.read_bytes()
    server.plans["/tm.txt"] = [Drop(corpus), corpus]
    params = params_with(workdir, sources=[server.url("/tm.txt")], retries=2)

    assert written(run_configured(params)) == OUTS
    assert server.hits["/tm.txt"] == 2
    assert OUT.read_bytes() == corpus
    assert leftovers(OUT.parent) == []


@pytest.mark.parametrize("response", [404, b"wrong content\n"], ids=["404", "checksum"])
def test_prefect_does_not_retry_final_failures(prefect_server: None, workdir: Path,
                                               server: Server, response: bytes | int) -> None:
    server.plans["/tm.txt"] = [response]
    params = params_with(workdir, sources=[server.url("/tm.txt")], retries=2)

    with pytest.raises(AllSourcesFailed):
        run_configured(params)
    assert server.hits["/tm.txt"] == 1
    assert not OUT.exists()
