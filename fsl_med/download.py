"""Download public dataset archives: ``fsl-med download chaos --out DIR``.

Downloads are resumable (bytes go to ``<file>.part``; a rerun or a retry asks for the rest with an HTTP
``Range`` request), retried on connection errors and timeouts, and verified by SHA-256 before the part
file is renamed (atomically) onto its final name. A file under the final name is always complete and, when
a hash is known, verified. Only the standard library (``urllib``) and ``tqdm`` are used.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from fsl_med import __version__
from fsl_med.atomic import ensure_writable_dir, sha256_file, write_text
from fsl_med.errors import DataError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 16
_BACKOFF_S = 0.5  # wait before retry k: _BACKOFF_S * 2**(k-1) seconds, at most _MAX_BACKOFF_S
_MAX_BACKOFF_S = 10.0
_MAX_RESTARTS = 3  # restarts from zero (server answers a range we did not ask for, 416 on a bad part)
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Archive:
    """A downloadable archive: where it is, what it is called, how to check it, and its terms."""

    name: str
    filename: str
    url: str
    sha256: str | None  # None: not known; the first download records it in <filename>.sha256
    record: str  # the record page, for downloading it by hand
    licence: str


ARCHIVES: dict[str, Archive] = {
    "chaos": Archive(
        name="chaos",
        filename="CHAOS_Train_Sets.zip",
        url="https://zenodo.org/records/3431873/files/CHAOS_Train_Sets.zip?download=1",
        # Zenodo lists only md5 (df21053002a1cc86df918a87da3b2c19, 890,771,694 bytes); this SHA-256 is the
        # one torch-em (torch_em/data/datasets/medical/chaos.py) checks, and others report the same value.
        sha256="535f7d3417a0e0f0d9133fb3d962423d2a9cf3f103e4f09a3d8a1daf87d5d2fc",
        record="https://doi.org/10.5281/zenodo.3431873",
        licence="as stated on the record page (sources differ: CC BY-SA 4.0 / CC BY-NC-SA 4.0)",
    ),
}


class _Transient(Exception):
    """A failure worth retrying (connection refused, timeout, dropped connection, HTTP 5xx)."""

    def __init__(self, message: str, unreachable: bool) -> None:
        super().__init__(message)
        self.unreachable = unreachable  # no HTTP response at all (as opposed to one cut short)


class _Restart(Exception):
    """The part file was discarded; download again from byte zero (does not count as a retry)."""


def download_archive(
    name: str,
    out_dir: str | os.PathLike[str],
    url: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 30.0,
) -> Path:
    """Download archive ``name`` (a key of :data:`ARCHIVES`) into ``out_dir``; returns the file's path.

    Args:
        name: archive name, e.g. ``"chaos"``.
        out_dir: output folder, created if needed.
        url: download from here instead of the registry's URL. The registry's hash then does not apply
            (it is another file), only ``sha256``.
        sha256: expected SHA-256 (hex); overrides the registry's.
        progress: show a progress bar on stderr (only when stderr is a terminal).
        retries: retries after connection errors, timeouts, dropped connections and HTTP 408/429/5xx;
            each retry continues from the part file.
        timeout: seconds to wait for a connection or for data.

    Behaviour:
        * Bytes go to ``<out_dir>/<filename>.part``. If it exists the download asks for the rest
          (``Range: bytes=N-``): a 206 answer is appended, a 200 answer (server ignores ranges) restarts
          from zero, a 416 answer means the part is complete when its size equals the total the server
          reports, else the part is deleted and the download restarts.
        * When complete, the SHA-256 is checked (when an expected hash is known) and the part file is
          renamed onto ``<filename>`` (``os.replace``); the hash is written to ``<filename>.sha256``
          (``sha256sum`` format) and, when it was not known beforehand, logged.
        * If ``<filename>`` exists and no hash is known (neither expected nor in ``<filename>.sha256``), or
          its hash matches, nothing is downloaded. If its hash does not match, it is downloaded again; the
          existing file is replaced only by a complete, verified download (a failed one leaves it as it was).
        * A checksum mismatch deletes the part file. Other failures keep it, so a rerun resumes.

    Raises:
        DataError: unknown archive name, bad URL or hash, output folder not creatable or not writable,
            HTTP error status, host unreachable (after the retries), download cut short (after the
            retries), checksum mismatch. Messages are one line and name the URL or file.
    """
    archive = ARCHIVES.get(name)
    if archive is None:
        raise DataError(f"unknown archive {name!r} (valid: {', '.join(sorted(ARCHIVES))})")
    src = url or archive.url
    try:
        parts = urllib.parse.urlsplit(src)
        _ = parts.port  # an invalid port or IPv6 host raises here, not in the middle of the download
    except ValueError as e:
        raise DataError(f"invalid URL {src!r}: {e}") from e
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise DataError(f"unsupported URL {src!r}: only http:// and https:// downloads are supported")
    if sha256 is not None:
        expected: str | None = _check_hash(sha256, "--sha256")
    else:
        expected = archive.sha256 if url is None else None
    out = ensure_writable_dir(out_dir)
    final = out / archive.filename
    part = final.with_name(final.name + ".part")
    sidecar = final.with_name(final.name + ".sha256")

    if final.exists() or final.is_symlink():
        if not final.is_file():
            raise DataError(f"{final} exists and is not a file; move it away and rerun")
        known = expected or _read_sidecar(sidecar)
        if known is None:
            log.info("%s is up to date (exists; no SHA-256 known to verify it)", final)
            return final
        actual = sha256_file(final)
        if actual == known:
            log.info("%s is up to date (SHA-256 verified)", final)
            return final
        log.warning("%s has SHA-256 %s, expected %s: downloading it again (it is kept until the new download "
                    "is complete and verified)", final, actual, known)

    log.info("downloading %s (licence %s) from %s to %s", archive.filename, archive.licence, src, final)
    _fetch(src, part, archive, progress=progress, retries=max(0, retries), timeout=timeout)
    actual = sha256_file(part)
    if expected is not None and actual != expected:
        _unlink(part)
        raise DataError(
            f"checksum mismatch for {final.name} downloaded from {src}: expected SHA-256 {expected}, "
            f"got {actual} (the partial file was deleted)"
        )
    try:
        os.replace(part, final)
        write_text(sidecar, f"{actual}  {final.name}\n")
    except OSError as e:
        raise DataError(f"cannot write {final}: {e.strerror or e}") from e
    if expected is None:
        log.info("SHA-256 of %s: %s (recorded in %s)", final.name, actual, sidecar)
    return final


def _check_hash(value: str, what: str) -> str:
    h = value.strip().lower()
    if not _HEX64.fullmatch(h):
        raise DataError(f"{what} {value!r} is not a SHA-256 (64 hexadecimal digits)")
    return h


def _read_sidecar(sidecar: Path) -> str | None:
    """The hash recorded in ``<file>.sha256`` by an earlier download, or None (absent or unreadable)."""
    try:
        words = sidecar.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError):
        return None
    h = words[0].lower() if words else ""
    return h if _HEX64.fullmatch(h) else None


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        raise DataError(f"cannot delete {path}: {e.strerror or e}") from e


def _one_line(x: object) -> str:
    return " ".join(str(x).split()) or type(x).__name__


def _fetch(url: str, part: Path, archive: Archive, progress: bool, retries: int, timeout: float) -> None:
    """Fill ``part`` with the whole file at ``url``: resume, retry, restart as described above."""
    failures = restarts = 0
    ever_answered = False
    while True:
        try:
            _attempt(url, part, progress=progress, timeout=timeout)
            return
        except _Restart:
            restarts += 1
            if restarts > _MAX_RESTARTS:
                raise DataError(f"download from {url} restarted {_MAX_RESTARTS} times from zero; giving up") from None
        except _Transient as e:
            failures += 1
            ever_answered = ever_answered or not e.unreachable
            if failures > retries:
                tries = f"{failures} {'try' if failures == 1 else 'tries'}"
                if not ever_answered:
                    raise DataError(
                        f"{e} after {tries}: no network? Download {archive.filename} by hand from "
                        f"{archive.record} and pass it to `fsl-med prepare {archive.name} --src FILE`"
                    ) from None
                kept = part.stat().st_size if part.is_file() else 0
                resume = f"; rerun to resume from byte {kept}" if kept else ""
                raise DataError(f"{e} after {tries}{resume}") from None
            wait = min(_BACKOFF_S * 2 ** (failures - 1), _MAX_BACKOFF_S)
            log.warning("%s; retry %d of %d in %.1f s", e, failures, retries, wait)
            time.sleep(wait)


def _attempt(url: str, part: Path, progress: bool, timeout: float) -> None:
    """One request: append to (206) or rewrite (200) ``part`` until the server's end of data."""
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": f"fsl_med/{__version__} (Python urllib)", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        with e:
            if e.code == 416 and offset:
                total = _content_range(e.headers.get("Content-Range"))[2]
                if total == offset:
                    return  # the part file is already complete
                log.warning("%s rejects the range from byte %d (size %s): restarting from zero", url, offset,
                            total if total is not None else "unknown")
                _unlink(part)
                raise _Restart from None
            msg = f"HTTP {e.code} {_one_line(e.reason)} from {url}"
            if e.code in _RETRY_STATUS:
                raise _Transient(msg, unreachable=False) from None
            raise DataError(msg) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise _Transient(f"cannot reach {url} ({_one_line(reason)})", unreachable=True) from None

    with resp:
        length = _int_or_none(resp.headers.get("Content-Length"))
        if resp.status == 206:
            start, _, total = _content_range(resp.headers.get("Content-Range"))
            if start != offset:
                log.warning("%s answered a range from byte %s when asked from byte %d: restarting from zero",
                            url, start, offset)
                _unlink(part)
                raise _Restart
            if total is None and length is not None:
                total = offset + length
            mode = "ab"
        elif resp.status == 200:
            if offset:
                log.info("%s ignores range requests: downloading again from byte zero", url)
            offset, total, mode = 0, length, "wb"
        else:
            raise DataError(f"unexpected HTTP {resp.status} {_one_line(resp.reason)} from {url}")

        written = offset
        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=part.stem,
                   file=sys.stderr, disable=not progress or not sys.stderr.isatty(), leave=False)
        try:
            f = open(part, mode)
        except OSError as e:
            bar.close()
            raise DataError(f"cannot write {part}: {e.strerror or e}") from e
        with f, bar:
            while True:
                try:
                    chunk = resp.read(CHUNK_BYTES)
                except (OSError, http.client.HTTPException) as e:
                    raise _Transient(f"download from {url} cut short at byte {written} ({_one_line(e)})",
                                     unreachable=False) from None
                if not chunk:
                    break
                try:
                    f.write(chunk)
                except OSError as e:
                    raise DataError(f"cannot write {part}: {e.strerror or e}") from e
                written += len(chunk)
                bar.update(len(chunk))
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                raise DataError(f"cannot write {part}: {e.strerror or e}") from e
    if total is not None and written < total:
        raise _Transient(f"download from {url} cut short at byte {written} of {total}", unreachable=False)
    if total is not None and written > total:
        _unlink(part)
        raise DataError(f"{url} sent {written} bytes, more than the {total} it announced (part file deleted)")


def _int_or_none(s: str | None) -> int | None:
    try:
        return int(s) if s is not None else None
    except ValueError:
        return None


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """``bytes START-END/TOTAL`` or ``bytes */TOTAL`` -> (start, end, total), None where absent or ``*``."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)\s*/\s*(\d+|\*)\s*", value or "")
    if m is None:
        return None, None, None
    start, end, total = (int(g) if g is not None and g != "*" else None for g in m.groups())
    return start, end, total
