"""Atomic file output: write to a temporary file in the destination folder, then rename.

A reader (or a crash) never sees a half-written file: either the old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success rename it onto ``dest``.

    Args:
        dest: final file path. Its parent folder is created if needed.
        suffix: suffix of the temporary file (defaults to ``dest``'s full suffix, e.g. ``.nii.gz``,
            so that libraries choosing a format by extension still work).

    On an exception the temporary file is removed and ``dest`` is left untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(dest.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".tmp{suffix}", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_text(dest: str | os.PathLike[str], text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``dest``; returns ``dest`` as a Path."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(dest)


def write_json(dest: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON to ``dest``; returns ``dest`` as a Path."""
    return write_text(dest, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's content.

    Raises:
        DataError: the file cannot be read (the message names it).
    """
    from fsl_med.errors import DataError

    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    return h.hexdigest()


def ensure_writable_dir(path: str | os.PathLike[str], what: str = "output folder") -> Path:
    """Create ``path`` (and parents) if needed and check that it is a writable folder.

    Args:
        what: how the folder is named in messages (e.g. ``"--out out/"``).

    Raises:
        DataError: it exists but is not a folder, cannot be created, or is not writable.
    """
    from fsl_med.errors import DataError

    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise DataError(f"{what}: {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{what}: cannot create {out} ({e.strerror or e})") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise DataError(f"{what}: {out} is not writable")
    return out
