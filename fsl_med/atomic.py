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

    On an exception the temporary file is removed and ``dest`` is left untouched; an OS error while writing
    (no space left, a file-size limit, permission denied) becomes a one-line
    :class:`~fsl_med.errors.WriteError` naming ``dest`` (still an ``OSError`` with its errno).
    """
    from fsl_med.errors import FslMedError, write_error

    dest = Path(dest)
    if suffix is None:
        suffix = "".join(dest.suffixes)
    created = first_missing(dest.parent)  # removed again (while empty) if the write fails
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".tmp{suffix}", dir=dest.parent)
    except OSError as e:
        if created is not None:
            remove_empty_folders(dest.parent, created)
        raise write_error(dest, e) from e
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        yield tmp_path
        os.replace(tmp_path, dest)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if created is not None:
            remove_empty_folders(dest.parent, created)
        # an OS error writing the temporary file (or renaming it) is a write fault of `dest`: name it. An OS error
        # about another file (the body read something) passes through as it is.
        if isinstance(exc, OSError) and not isinstance(exc, FslMedError) \
                and (exc.filename is None or Path(exc.filename) in (tmp_path, dest)):
            raise write_error(dest, exc) from exc
        raise


def first_missing(path: str | os.PathLike[str]) -> Path | None:
    """The highest of ``path`` and its parents that does not exist (the first folder that creating ``path`` with
    its parents creates), or None when ``path`` exists."""
    p = Path(path)
    if p.exists():
        return None
    while not p.parent.exists() and p.parent != p:
        p = p.parent
    return p


def remove_empty_folders(folder: Path, up_to: Path) -> None:
    """Remove ``folder`` and its parents up to ``up_to`` while they are empty (the folders a failed write created,
    :func:`first_missing`)."""
    for p in (folder, *folder.parents):
        try:
            p.rmdir()
        except OSError:
            return
        if p == up_to:
            return


def replace_folder(dest: Path, staged: Path) -> None:
    """Put the complete folder ``staged`` (a sibling of ``dest``) in the place of ``dest``: the old folder is renamed
    aside, ``staged`` renamed in, and only then the old content removed; if the second rename fails the old folder
    is put back.

    Raises:
        WriteError: naming ``dest`` and the OS error (``dest`` then holds its old content).
    """
    import shutil

    from fsl_med.errors import write_error

    old = dest.with_name(f".{dest.name}.old-{os.getpid()}") if dest.exists() else None
    try:
        if old is not None:
            os.replace(dest, old)
        os.replace(staged, dest)
    except OSError as e:
        if old is not None and old.exists() and not dest.exists():
            with contextlib.suppress(OSError):
                os.replace(old, dest)
        raise write_error(dest, e) from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


def _resolved(path: str | os.PathLike[str]) -> Path:
    return Path(path).expanduser().resolve()


def is_same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when ``a`` and ``b`` are one file: the same resolved path, or (both existing) the same inode, which
    catches symbolic and hard links."""
    if _resolved(a) == _resolved(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_overwriting_inputs(out: str | os.PathLike[str], inputs: dict[str, str | os.PathLike[str]],
                              what: str = "--out") -> None:
    """Refuse an output file that is one of the command's inputs (before any work is done).

    Args:
        out: the output file.
        inputs: option name -> input path (e.g. ``{"--query": q}``).
        what: the output's option name in the message.

    Raises:
        DataError: ``out`` is, or links to, one of ``inputs``.
    """
    from fsl_med.errors import DataError

    for option, path in inputs.items():
        if path is not None and is_same_file(out, path):
            raise DataError(f"{what} {out}: is the input {option} {path}; fsl-med never writes over its inputs "
                            "(choose another output path)")


def refuse_nested(out_dir: str | os.PathLike[str], other: str | os.PathLike[str], what: str, other_what: str,
                  may_contain: bool = False) -> None:
    """Refuse an output folder that is, contains or lies inside an input folder (resolved, links followed);
    with ``may_contain``, one that holds the input somewhere below it is allowed (it writes only its own files).

    Raises:
        DataError: naming both folders and how they overlap.
    """
    from fsl_med.errors import DataError

    a, b = _resolved(out_dir), _resolved(other)
    if a == b or is_same_file(a, b):
        how = "is"
    elif b in a.parents:
        how = "lies inside"
    elif a in b.parents and not may_contain:
        how = "contains"
    else:
        return
    raise DataError(f"{what} {out_dir}: {how} {other_what} {other}; outputs must be kept apart from inputs "
                    "(choose another folder)")


def check_output_file(path: str | os.PathLike[str], what: str = "--out") -> None:
    """Check, before any work and without creating anything, that ``path`` can be written: it is not a folder,
    and its nearest existing parent is a writable folder (missing folders below it are created on writing).

    Raises:
        DataError: naming the path and the OS error (not a directory, permission denied).
    """
    import errno

    from fsl_med.errors import DataError

    p = Path(path).expanduser()
    if p.is_dir():
        raise DataError(f"{what} {path}: is a folder, not a file")
    anc = p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise DataError(f"{what} {path}: cannot create it: {anc} is a file ({os.strerror(errno.ENOTDIR)})")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise DataError(f"{what} {path}: cannot write in {anc} ({os.strerror(errno.EACCES)})")
