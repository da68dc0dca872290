"""One writer at a time: an advisory lock file that names its holder (pid, host, start time, command).

A prepared data folder and each superpixel cache entry have one writer at a time. Many jobs of a cluster run
against one data folder and one cache, so a second writer either waits for the first (a cache entry: it then
reads what the first wrote) or is refused with one line naming the holder (``prepare``).

The lock is the kernel's ``flock`` on the lock file, so a holder that dies (even by SIGKILL) releases it at
once: a lock file left behind by a dead process never blocks anyone (its content is stale, and the next holder
writes its own). The file is removed on release. On a file system without ``flock`` (some cluster mounts) the
lock degrades to a warning, once per folder, and the write goes ahead as before.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fsl_med.errors import DataError

log = logging.getLogger(__name__)

_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_warned: set[str] = set()


class Locked(DataError):
    """Another process holds the lock; the message names it (pid, host, since when, its command)."""


def describe_holder(lock_file: Path) -> str:
    """``pid 123 on host h since 2026-12-07T10:00:00 (fsl-med prepare chaos ...)`` from a lock file's content,
    or ``another process`` when it cannot be read (the holder is still writing it)."""
    try:
        info: dict[str, Any] = json.loads(lock_file.read_text(encoding="utf-8"))
        return (f"pid {info['pid']} on host {info['host']} since {info['since']}"
                + (f" ({info['command']})" if info.get("command") else ""))
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _holder_record() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                       "command": " ".join(["fsl-med", *sys.argv[1:]])[:200]})


@contextlib.contextmanager
def exclusive(lock_file: str | os.PathLike[str], what: str, *, wait: float = 0.0,
              poll: float = 0.2) -> Iterator[bool]:
    """Hold the lock ``lock_file`` for the ``with`` block.

    Args:
        lock_file: the lock's path (its folder must exist); removed on release.
        what: what is being written, for the message (e.g. ``"--out data/chaos"``).
        wait: seconds to wait for a holder to finish; 0 refuses at once.
        poll: seconds between tries while waiting.
    Yields:
        True when the lock is held; False when the file system does not support locks (one warning said so).
    Raises:
        Locked: another process holds it (after ``wait`` seconds); the message names the holder and the lock file.
        DataError: the lock file cannot be created (the message names it and the OS error).
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks
        yield False
        return
    path = Path(lock_file)
    deadline = time.monotonic() + max(wait, 0.0)
    supported = True
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DataError(f"{what}: cannot create the lock file {path} ({e.strerror or e})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in _UNSUPPORTED:
                if str(path.parent) not in _warned:
                    _warned.add(str(path.parent))
                    log.warning("%s: the file system does not support locks (%s); make sure no other process "
                                "writes it at the same time", what, e.strerror or e)
                supported = False
                break
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DataError(f"{what}: cannot lock {path} ({e.strerror or e})") from e
            if time.monotonic() >= deadline:
                raise Locked(f"{what}: is being written by {describe_holder(path)}; wait until it finishes (or, if "
                             f"that process is gone, remove {path})") from None
            time.sleep(poll)
            continue
        try:  # the file we locked must still be the one at `path` (a releasing holder may have removed it)
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        break
    if not supported:
        yield False
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, _holder_record().encode())
        yield True
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # before the unlock: a waiter that then locks the old file sees it is gone and retries
        os.close(fd)
