"""Ctrl-C and SIGTERM during a run: drain first, cancel on the second signal.

While a :class:`~typeflow.Run` is iterated in the main thread it owns SIGINT and
SIGTERM (the previous handlers come back when the run ends):

* the first signal stops reading input; items already read finish and are
  yielded, for at most ``grace`` seconds;
* a second signal, or the end of the grace period, cancels the run at once;
* either way, once every worker is joined the run raises ``KeyboardInterrupt``
  (SIGINT) or ``SystemExit(128 + SIGTERM)`` (SIGTERM) to its caller.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["SignalGuard"]

_Handler = Callable[[int, FrameType | None], Any] | int | None


class SignalGuard:
    """Owns SIGINT/SIGTERM for one run; calls ``drain`` then ``cancel``."""

    def __init__(self, drain: Callable[[], None], cancel: Callable[[], None], grace: float) -> None:
        self._drain = drain
        self._cancel = cancel
        self._grace = grace
        #: The handlers this guard replaced (kept after they are given back: a
        #: retired guard that still gets a signal passes it on to them).
        self._previous: dict[int, _Handler] = {}
        self._installed = False
        self._timer: threading.Timer | None = None
        self._retired = False
        #: While the run is being stopped: a signal waits in ``_pending`` until its
        #: workers are joined (see :meth:`stopping`).
        self._stopping = False
        self._pending: int | None = None
        self.received: int | None = None

    def install(self) -> bool:
        """Take over the signals; False (and nothing done) outside the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(signum)
            if signum == signal.SIGTERM and previous is signal.SIG_IGN:
                continue  # somebody chose to ignore SIGTERM: keep it that way
            self._previous[signum] = previous
            signal.signal(signum, self._handle)
        self._installed = True
        return True

    def restore(self) -> None:
        """Give the signals back and stop the grace timer.  Safe to call twice."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._installed or threading.current_thread() is not threading.main_thread():
            return
        self._installed = False
        for signum in self._previous:
            handler = self._live(signum, self._previous[signum])
            if handler is not None:
                signal.signal(signum, handler)

    def stopping(self) -> None:
        """The run is being stopped and its workers joined: a signal that comes now
        (Ctrl-C during a ``break`` or ``close()``) waits until that is over, then
        goes to the handler this guard replaced (see :meth:`retire`), so that the
        workers' teardowns run first."""
        self._stopping = True

    def retire(self) -> None:
        """The run has stopped: give the signals back now if this is the main thread,
        and pass on a signal that came while it was stopping.

        Whatever the thread, a signal that still reaches this guard afterwards
        (its run was dropped by a ``break`` and collected elsewhere, say) gives
        the signals back and goes to the handler it replaced; the run itself is
        let go.
        """
        self._retired = True
        self._drain = self._cancel = _nothing
        self.restore()
        pending, self._pending = self._pending, None
        if pending is not None:
            signal.raise_signal(
                pending
            )  # to the handler now in place (or this guard's: see _handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._stopping and not self._retired:
            if self._pending is None:
                self._pending = signum
            return
        if self._retired:
            handler = self._live(signum, self._previous.get(signum))
            if handler is not None:
                signal.signal(signum, handler)  # handlers run in the main thread
            _forward(signum, frame, handler)
            return
        if self.received is None:
            self.received = signum
            self._timer = threading.Timer(self._grace, self._cancel)
            self._timer.daemon = True
            self._timer.start()
            self._drain()
        else:
            self._cancel()

    @staticmethod
    def _live(signum: int, handler: _Handler) -> _Handler:
        """``handler``, or if it belongs to a guard whose run has stopped (runs that
        did not end in the order they began), the handler that guard replaced."""
        guard = getattr(handler, "__self__", None)
        while isinstance(guard, SignalGuard) and guard._retired:
            handler = guard._previous.get(signum)
            guard = getattr(handler, "__self__", None)
        return handler

    def raise_received(self) -> None:
        """Raise what the received signal stands for (after the run has stopped)."""
        if self.received == signal.SIGTERM:
            raise SystemExit(128 + signal.SIGTERM) from None
        if self.received is not None:
            raise KeyboardInterrupt from None  # not "during handling of" the run's end


def _nothing() -> None:
    pass


def _forward(signum: int, frame: FrameType | None, handler: _Handler) -> None:
    """Act on a signal as ``handler`` (the one a retired guard replaced) would."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)  # the default action, now that it is back
