"""SIGINT and SIGTERM as an honest, resumable stop.

The CLI runs each verb inside :func:`installed`. A signal then raises :class:`Interrupted` at once, except inside
:func:`deferred` (a Lightning fit/test loop), where it is recorded and raised at the next batch boundary
(``fsl_med.runs.StopOnSignal``), so that a checkpoint holds a completed step. A second signal while one is
pending raises at once; once the stop is under way (e.g. writing ``last.ckpt``), further signals are logged
and ignored, so the checkpoint is never cut off. This module imports nothing heavy, so the CLI installs it before a verb imports torch. The process exits ``128 + signum`` (130 for SIGINT, 143 for SIGTERM), the convention of
shells, SLURM and Kubernetes, so a scheduler or sweep agent never records an interrupted run as a success.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A run stopped by SIGINT or SIGTERM (a ``BaseException``, like ``KeyboardInterrupt``: ``except Exception``
    does not swallow it).

    Attributes:
        signum: the signal number.
        detail: what was saved and how to resume, filled in by the verb that was interrupted.
    """

    def __init__(self, signum: int, detail: str = "") -> None:
        super().__init__(signum, detail)
        self.signum = int(signum)
        self.detail = detail

    @property
    def name(self) -> str:
        """``SIGINT`` or ``SIGTERM``."""
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """``128 + signum``: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum

    def with_detail(self, detail: str) -> Interrupted:
        """The same interruption with ``detail`` (a new exception; this one is not changed)."""
        return Interrupted(self.signum, detail)


_state: dict[str, Any] = {"defer": 0, "pending": None, "installed": False, "stopping": False, "signals": SIGNALS}


def _handler(signum: int, frame: FrameType | None) -> None:
    if _state["stopping"]:  # the stop is under way (a checkpoint may be being written): let it finish
        log.warning("received %s again: already stopping", signal.Signals(signum).name)
        return
    if _state["defer"] and _state["pending"] is None:
        _state["pending"] = signum
        log.warning("received %s: stopping after the current step or query volume (send it again to stop at once)",
                    signal.Signals(signum).name)
        return
    _state["stopping"] = True
    raise Interrupted(signum)


@contextlib.contextmanager
def installed(extra: tuple[int, ...] = ()) -> Iterator[None]:
    """Inside, SIGINT and SIGTERM (and the signals of ``extra``, e.g. SIGUSR2, which SLURM sends before a job's time
    limit) raise :class:`Interrupted` (main thread only; elsewhere nothing changes).
    The previous handlers are restored on exit, except after a stop by a signal: then both signals stay ignored,
    since the caller (the CLI) exits with ``128 + signum`` next and a repeated signal must not kill it first.

    Lightning composes its own SIGTERM handler with this one while it fits, so both run.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = tuple(dict.fromkeys((*SIGNALS, *extra)))
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        signal.signal(sig, _handler)
    _state.update(pending=None, installed=True, stopping=False, signals=signals)
    try:
        yield
    finally:
        stopping = _state["stopping"]
        for sig, handler in previous.items():
            # after a stop the process is about to exit 128 + signum: a late repeat must not kill it first
            signal.signal(sig, signal.SIG_IGN if stopping else (handler if handler is not None else signal.SIG_DFL))
        _state.update(pending=None, installed=False, stopping=False, signals=SIGNALS)


def reclaim() -> None:
    """Inside :func:`installed`, make this module's handler the only one for SIGINT and SIGTERM again.

    Lightning's own SIGTERM handler (registered when a fit/test starts) relays the signal to the processes it
    launched and broadcasts a flag from inside the handler; under DDP that broadcast can meet another rank's
    all-reduce and hang both. :class:`fsl_med.runs.StopOnSignal` stops all ranks together instead. Lightning
    restores the handler it replaced (this one) when it tears down."""
    if _state["installed"] and threading.current_thread() is threading.main_thread():
        for sig in _state["signals"]:
            signal.signal(sig, _handler)


def set_pending(signum: int) -> None:
    """Record ``signum`` as pending (another rank received it)."""
    _state["pending"] = int(signum)


def pending() -> int | None:
    """The signal received inside :func:`deferred` and not yet acted on (``None``: none)."""
    return _state["pending"]


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside, a first signal is recorded instead of raised; :func:`raise_pending`
    raises it at a safe point. A signal still pending when the block ends is raised there."""
    _state["defer"] += 1
    try:
        yield
    finally:
        _state["defer"] -= 1
    raise_pending()


def raise_pending() -> None:
    """Raise :class:`Interrupted` if a signal is pending (and clear it)."""
    sig = _state["pending"]
    if sig is not None:
        _state["pending"], _state["stopping"] = None, True
        raise Interrupted(sig)


def signal_of(exc: BaseException) -> int | None:
    """The signal behind an exception that stopped a Lightning loop: :class:`Interrupted`, or Lightning's own
    ``SIGTERMException`` (raised when its SIGTERM handler saw the signal first); ``None`` for anything else."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if isinstance(exc, Interrupted):
        return exc.signum
    if isinstance(exc, SIGTERMException):  # the signal this process recorded, else rank 0's SIGTERM
        sig = _state["pending"]
        _state["pending"], _state["stopping"] = None, True
        return int(sig) if sig is not None else int(signal.SIGTERM)
    return None
