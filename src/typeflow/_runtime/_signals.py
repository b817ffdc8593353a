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
        self._previous: dict[int, _Handler] = {}
        self._timer: threading.Timer | None = None
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
        return True

    def restore(self) -> None:
        """Give the signals back and stop the grace timer.  Safe to call twice."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            self._timer = threading.Timer(self._grace, self._cancel)
            self._timer.daemon = True
            self._timer.start()
            self._drain()
        else:
            self._cancel()

    def raise_received(self) -> None:
        """Raise what the received signal stands for (after the run has stopped)."""
        if self.received == signal.SIGTERM:
            raise SystemExit(128 + signal.SIGTERM)
        if self.received is not None:
            raise KeyboardInterrupt
