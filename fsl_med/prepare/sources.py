"""Read-only access to an official download: an extracted folder or the zip archive itself.

Preparation never modifies its source; it reads files through :class:`Source`, which lists
relative POSIX paths and returns their bytes, whether they live in a folder or in a zip.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

from fsl_med.errors import DataError


class Source:
    """A folder or a ``.zip`` file, seen as a sorted list of relative file paths.

    Args:
        path: folder or zip archive.

    Raises:
        DataError: the path does not exist, or is a file that is not a readable zip archive.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._zip: zipfile.ZipFile | None = None
        if not self.path.exists():
            raise DataError(f"source not found: {self.path}")
        if self.path.is_dir():
            self.kind = "folder"
            self._files = sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file())
        else:
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as e:
                raise DataError(f"{self.path}: not a folder and not a readable zip archive ({e})") from e
            self.kind = "zip"
            self._files = sorted(i.filename for i in self._zip.infolist() if not i.is_dir())

    def files(self) -> list[str]:
        """All file paths, relative to the source root, ``/``-separated, sorted."""
        return list(self._files)

    def read(self, rel: str) -> bytes:
        """The bytes of one file.

        Raises:
            DataError: unreadable (e.g. a corrupt zip member), naming the member.
        """
        try:
            if self._zip is not None:
                return self._zip.read(rel)
            return (self.path / rel).read_bytes()
        except (OSError, zipfile.BadZipFile, KeyError) as e:
            raise DataError(f"{self.path}: cannot read {rel} ({e})") from e

    def fingerprint(self, rels: list[str]) -> str:
        """A cheap identity of some files (names, sizes, and mtime or CRC), to tell if a source changed."""
        h = hashlib.sha256()
        for rel in sorted(rels):
            if self._zip is not None:
                info = self._zip.getinfo(rel)
                h.update(f"{rel}\0{info.file_size}\0{info.CRC}\n".encode())
            else:
                st = (self.path / rel).stat()
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    def describe(self, rel: str) -> str:
        """``path/rel`` for a folder, ``archive.zip:rel`` for a zip (used in messages)."""
        return f"{self.path}:{rel}" if self._zip is not None else str(self.path / rel)

    def close(self) -> None:
        """Close the zip archive, if any."""
        if self._zip is not None:
            self._zip.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
