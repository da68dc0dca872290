"""User-facing errors.

Every error a user can cause (bad config, bad file, bad weights) is raised as a subclass of
:class:`FslMedError` with a one-line message that names the setting or file and what is wrong.
The CLI prints such errors as one line and exits non-zero (traceback only with ``--debug``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any


class FslMedError(Exception):
    """Base class of every error caused by user input; its message is one line."""


class ConfigError(FslMedError):
    """A configuration key, type or value is invalid."""


class DataError(FslMedError):
    """A data folder or file is missing, unreadable or inconsistent."""


class WeightsError(FslMedError):
    """A weight file or checkpoint is missing, unreadable or of another architecture."""


class TrainingDiverged(FslMedError):
    """Training produced a non-finite loss or gradient; the message names the step and the episodes."""


class FilesystemError(FslMedError):
    """A file or folder cannot be read or written (permission denied, no space left, not a directory); the
    message names the path and the operating system's reason."""


class WriteError(FilesystemError, OSError):
    """A file could not be written (no space left, a file-size limit, permission denied, a read-only file system).
    Also an :class:`OSError` carrying the original ``errno``/``strerror``, so handlers of OS errors still see it;
    its message is one line naming the file and the operating system's reason."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "cannot write a file"


def write_error(dest: object, exc: OSError) -> WriteError:
    """``WriteError("cannot write DEST: <OS reason>")`` with ``exc``'s errno and strerror."""
    err = WriteError(f"cannot write {dest}: {exc.strerror or exc}")
    err.errno, err.strerror = exc.errno, exc.strerror
    return err


def os_reason(exc: BaseException) -> OSError | None:
    """The ``OSError`` behind ``exc`` (itself, or in its ``__cause__``/``__context__`` chain), or ``None``."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 10:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
        seen += 1
    return None


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of ``str(exc)``, cut to ``limit`` characters (for one-line error messages)."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


# -- how messages name arguments: the Python keyword, or its flag on the command line -------------------

_FLAGS: ContextVar[Mapping[str, str] | None] = ContextVar("fsl_med_flags", default=None)
"""Keyword -> command-line flag while the CLI runs a verb (:func:`spelled_as`); ``None`` in Python calls."""


@contextmanager
def spelled_as(flags: Mapping[str, str]) -> Iterator[None]:
    """Within this block, messages of :func:`arg` and :func:`given` name an argument by its flag (``flags``:
    keyword -> flag, e.g. ``{"plan": "--plan"}``) instead of its Python keyword. The CLI enters it once around
    a verb with the flags of the verb's parser, so one message serves both spellings."""
    token = _FLAGS.set(dict(flags))
    try:
        yield
    finally:
        _FLAGS.reset(token)


def arg(name: str) -> str:
    """How a message names the argument of Python keyword ``name``: ``name`` itself, or its flag (``--name``) in
    :func:`spelled_as` (a keyword without a flag keeps its name)."""
    flags = _FLAGS.get()
    return flags.get(name, name) if flags is not None else name


def given(name: str, value: Any, shown: str | None = None) -> str:
    """An argument with the value it was given, as the caller spelled it: ``name=<repr(value)>`` in Python
    (``plan='pet'``), ``--flag <shown>`` on the command line (``--plan pet``; ``shown`` defaults to
    ``str(value)``)."""
    flags = _FLAGS.get()
    if flags is None or name not in flags:
        return f"{name}={value!r}"
    return f"{flags[name]} {str(value) if shown is None else shown}"


class Placeholder(str):
    """A placeholder for a value in a hint, shown as is in both spellings (``given("label", Placeholder("N"))``:
    ``label=N`` / ``--label N``)."""

    def __repr__(self) -> str:
        return str(self)
