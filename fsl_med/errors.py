"""User-facing errors.

Every error a user can cause (bad config, bad file, bad weights) is raised as a subclass of
:class:`FslMedError` with a one-line message that names the setting or file and what is wrong.
The CLI prints such errors as one line and exits non-zero (traceback only with ``--debug``).
"""

from __future__ import annotations


class FslMedError(Exception):
    """Base class of every error caused by user input; its message is one line."""


class ConfigError(FslMedError):
    """A configuration key, type or value is invalid."""


class DataError(FslMedError):
    """A data folder or file is missing, unreadable or inconsistent."""


class WeightsError(FslMedError):
    """A weight file or checkpoint is missing, unreadable or of another architecture."""
