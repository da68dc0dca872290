"""The on-disk cache of per-volume pseudolabels (2D superpixels, 3D supervoxels): one ``.npz`` entry per image file and
parameter key, written atomically by one writer at a time, and tolerant of a read-only cache.

A cache that cannot be written for lack of permission (a shared read-only cache, a read-only mount: ``EACCES``,
``EPERM``, ``EROFS``) is used as it is: entries already there are read, missing ones are computed and not stored, and
one warning line per folder says so. A cache path that cannot be a folder (it, or a folder above it, is a regular
file) or any other OS error when creating or writing it is a :class:`~fsl_med.errors.DataError` naming the path.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fsl_med.atomic import atomic_path
from fsl_med.errors import DataError, os_reason
from fsl_med.locks import Locked, exclusive

_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}
_warned: set[str] = set()
LOCK_WAIT_S = 1800.0
"""How long a job waits for another one computing the same entry (a CHAOS volume takes seconds to a minute)."""


@dataclass(frozen=True)
class VolumeCache:
    """One kind of cached volume.

    Attributes:
        kind: its name in messages (``"superpixel"``); also the folder (``<cache_dir>/<kind>s``) and the array's key in
            the ``.npz`` (``"<kind>s"``).
        what: what a read-only cache makes recomputed, in its warning (``"pseudolabels"``).
        hint: the settings that move the cache, in errors.
        logger: the logger of the read-only warning (the owning module's).
    """

    kind: str
    what: str
    hint: str = "data.cache_dir or FSL_MED_CACHE"
    logger: str = __name__

    def fault(self, folder: Path, err: OSError) -> None:
        """A read-only cache: warn once per folder; any other fault: :class:`DataError` naming the path."""
        reason = err.strerror or type(err).__name__
        if err.errno in _UNWRITABLE:
            if str(folder) not in _warned:
                _warned.add(str(folder))
                logging.getLogger(self.logger).warning("%s cache %s is not writable (%s): %s are computed without "
                                                       "caching", self.kind, folder, reason, self.what)
            return
        raise DataError(f"{self.kind} cache {folder}: cannot create or write it ({reason}); "
                        f"set {self.hint} to a writable folder") from err

    def read(self, dest: Path, shape: tuple[int, ...]) -> np.ndarray | None:
        """An entry's array, or None when it is missing, corrupt, unreadable or of another shape."""
        try:
            with np.load(dest) as z:
                arr = z[f"{self.kind}s"]
            return arr if arr.shape == shape else None
        except (OSError, ValueError, KeyError, EOFError):
            return None

    def write(self, dest: Path, arr: np.ndarray, folder: Path) -> None:
        """Store ``arr`` at ``dest`` atomically (a write fault: :meth:`fault`)."""
        try:
            with atomic_path(dest, suffix=".npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez_compressed(f, **{f"{self.kind}s": arr})
        except OSError as e:
            self.fault(folder, e)

    def load_or_make(self, cache_dir: str | Path, image_path: Path, key: str, shape: tuple[int, ...],
                     make: Callable[[], np.ndarray]) -> np.ndarray:
        """The entry of ``image_path`` under ``key`` (``[Z, H, W]`` of ``shape``), or ``make()`` computed and stored
        (one writer per entry: another job computing it is waited for, then its result is read).

        Raises:
            DataError: the cache path is not usable as a folder, or another OS error writing it.
            Locked: another job held the entry longer than :data:`LOCK_WAIT_S`.
        """
        folder = Path(cache_dir).expanduser() / f"{self.kind}s"
        writable = True
        try:
            folder.mkdir(parents=True, exist_ok=True)  # before the work: a cache path below a file fails now
        except FileExistsError as e:  # exists, but not as a folder
            raise DataError(f"{self.kind} cache {folder}: exists and is not a folder; set {self.hint} to a "
                            "folder") from e
        except OSError as e:
            self.fault(folder, e)
            writable = False
        dest = folder / f"{image_path.name.split('.')[0]}-{key}.npz"
        try:
            cached = dest.is_file()
        except OSError as e:  # a folder we may not search
            self.fault(folder, e)
            cached, writable = False, False
        if cached:
            arr = self.read(dest, shape)
            if arr is not None:
                return arr
        if not writable:
            return make()
        try:
            with exclusive(folder / f".{dest.name}.lock", f"{self.kind} cache entry {dest}", wait=LOCK_WAIT_S):
                arr = self.read(dest, shape)
                if arr is None:
                    arr = make()
                    self.write(dest, arr, folder)
        except Locked:
            raise
        except DataError as e:  # the lock file cannot be created: a read-only cache is used without caching
            reason = os_reason(e)
            if reason is None or reason.errno not in _UNWRITABLE:
                raise
            self.fault(folder, reason)
            arr = make()
        return arr
