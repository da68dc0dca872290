"""Tests of ``fsl_med.download`` and ``fsl-med download`` against a local HTTP server (no network)."""

from __future__ import annotations

import hashlib
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fsl_med.cli import main
from fsl_med.download import ARCHIVES, download_archive
from fsl_med.errors import DataError, FslMedError

PAYLOAD = random.Random(0).randbytes(300_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()
FILENAME = ARCHIVES["chaos"].filename
DROP_AT = 100_000  # the "drop" server closes its first answer after this many bytes


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    mode: str  # "range" (honours Range), "norange" (always 200), "404", "drop" (first answer cut short)
    ranges: list[str | None]  # the Range header of each request received (None: none)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{FILENAME}?download=1"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base class
        pass

    def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        srv, rng = self.server, self.headers.get("Range")
        srv.ranges.append(rng)
        if srv.mode == "404":
            self.send_error(404, "Not Found")
            return
        if srv.mode == "drop" and len(srv.ranges) == 1:
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:DROP_AT])
            return  # HTTP/1.0: the connection closes here, before the announced length
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and srv.mode != "norange":
            start = int(m.group(1))
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = PAYLOAD[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            body = PAYLOAD
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def serve() -> Iterator[Callable[[str], _Server]]:
    """A factory of local HTTP servers serving ``PAYLOAD`` in a given mode; all shut down afterwards."""
    servers: list[_Server] = []

    def start(mode: str = "range") -> _Server:
        srv = _Server(("127.0.0.1", 0), _Handler)
        srv.mode, srv.ranges = mode, []
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _get(url: str, out: Path, **kw: object) -> Path:
    return download_archive("chaos", out, url=url, progress=False, **kw)


def test_full_download_matches_bytes_and_hash(serve, tmp_path):
    srv = serve()
    path = _get(srv.url, tmp_path, sha256=SHA)
    assert path == tmp_path / FILENAME
    assert path.read_bytes() == PAYLOAD
    assert srv.ranges == [None]
    assert not (tmp_path / f"{FILENAME}.part").exists()


def test_sha256_file_written_when_no_hash_given(serve, tmp_path):
    path = _get(serve().url, tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert (tmp_path / f"{FILENAME}.sha256").read_text() == f"{SHA}  {FILENAME}\n"


def test_resume_from_part_sends_range(serve, tmp_path):
    srv, n = serve(), 123_456
    (tmp_path / f"{FILENAME}.part").write_bytes(PAYLOAD[:n])
    path = _get(srv.url, tmp_path, sha256=SHA)
    assert srv.ranges == [f"bytes={n}-"]
    assert path.read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_from_zero(serve, tmp_path):
    srv = serve("norange")
    (tmp_path / f"{FILENAME}.part").write_bytes(b"x" * 5000)  # wrong bytes: appending would be caught
    path = _get(srv.url, tmp_path, sha256=SHA)
    assert srv.ranges == ["bytes=5000-"]
    assert path.read_bytes() == PAYLOAD


def test_dropped_connection_retried_from_part(serve, tmp_path):
    srv = serve("drop")
    path = _get(srv.url, tmp_path, retries=1)
    assert srv.ranges == [None, f"bytes={DROP_AT}-"]
    assert path.read_bytes() == PAYLOAD


def test_complete_part_and_416_is_accepted(serve, tmp_path):
    srv = serve()
    (tmp_path / f"{FILENAME}.part").write_bytes(PAYLOAD)
    path = _get(srv.url, tmp_path, sha256=SHA)
    assert srv.ranges == [f"bytes={len(PAYLOAD)}-"]
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / f"{FILENAME}.part").exists()


def test_hash_mismatch_leaves_no_file(serve, tmp_path):
    wrong = "0" * 64
    with pytest.raises(DataError) as exc:
        _get(serve().url, tmp_path, sha256=wrong)
    msg = str(exc.value)
    assert FILENAME in msg and wrong in msg and SHA in msg and "\n" not in msg
    assert not (tmp_path / FILENAME).exists()
    assert not (tmp_path / f"{FILENAME}.part").exists()


def test_http_404_is_a_data_error(serve, tmp_path):
    srv = serve("404")
    with pytest.raises(DataError, match="404") as exc:
        _get(srv.url, tmp_path)
    assert srv.url in str(exc.value)
    assert srv.ranges == [None]  # not retried
    assert not (tmp_path / FILENAME).exists()


def test_unreachable_host_is_a_quick_data_error(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(DataError) as exc:
        _get(f"http://127.0.0.1:{port}/{FILENAME}", tmp_path, retries=0, timeout=2.0)
    assert time.monotonic() - t0 < 5
    msg = str(exc.value)
    assert f"127.0.0.1:{port}" in msg and "no network" in msg
    assert "fsl-med prepare chaos --src" in msg and ARCHIVES["chaos"].record in msg
    assert not (tmp_path / FILENAME).exists()


def test_existing_verified_file_is_not_downloaded_again(serve, tmp_path):
    srv = serve()
    _get(srv.url, tmp_path)
    srv.ranges.clear()
    assert _get(srv.url, tmp_path) == tmp_path / FILENAME  # checked against the .sha256 file
    assert _get(srv.url, tmp_path, sha256=SHA) == tmp_path / FILENAME
    assert srv.ranges == []


def test_existing_mismatching_file_is_downloaded_again(serve, tmp_path):
    srv = serve()
    (tmp_path / FILENAME).write_bytes(b"stale")
    path = _get(srv.url, tmp_path, sha256=SHA.upper())
    assert srv.ranges == [None]
    assert path.read_bytes() == PAYLOAD


def test_existing_mismatching_file_is_kept_until_a_verified_download_replaces_it(serve, tmp_path):
    mine = b"an archive the user already has"
    (tmp_path / FILENAME).write_bytes(mine)
    with pytest.raises(DataError, match="404"):  # the new download fails: the old file is untouched
        _get(serve("404").url, tmp_path, sha256=SHA)
    assert (tmp_path / FILENAME).read_bytes() == mine
    with pytest.raises(DataError, match="checksum mismatch"):  # a download that fails its check: untouched too
        _get(serve().url, tmp_path, sha256="1" * 64)
    assert (tmp_path / FILENAME).read_bytes() == mine
    assert not (tmp_path / f"{FILENAME}.part").exists()


def test_bad_name_hash_and_folder_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="valid: chaos"):
        download_archive("nope", tmp_path)
    with pytest.raises(DataError, match="not a SHA-256"):
        download_archive("chaos", tmp_path, sha256="abc")
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(FslMedError, match="not a folder"):
        download_archive("chaos", not_a_folder)


def test_cli_prints_the_path(serve, tmp_path, capsys):
    rc = main(["download", "chaos", "--out", str(tmp_path), "--url", serve().url, "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.strip().splitlines()[-1] == str(tmp_path / FILENAME)
    assert (tmp_path / FILENAME).read_bytes() == PAYLOAD


def test_cli_bad_hash_exits_2_with_one_error_line(serve, tmp_path, capsys):
    rc = main(["download", "chaos", "--out", str(tmp_path), "--url", serve().url, "--sha256", "f" * 64,
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    errors = [line for line in err.splitlines() if line.startswith("fsl-med: error:")]
    assert len(errors) == 1 and "checksum mismatch" in errors[0]
    assert "Traceback" not in err
    assert not (tmp_path / FILENAME).exists()
