"""Where a process worker is in its batch, in memory it shares with the parent.

Under a ``timeout`` a process worker still takes its items in batches.  Before
each call it writes down how many items it has begun and when it began the
latest one (``time.monotonic()``, a clock every process of the machine
shares), as two float64 values in a small shared mapping.  The parent reads
them only when a deadline passes, to tell which item the worker is on and
whether that item has had its full time: no system call per item on either
side, and each call still has its own deadline.

The mapping is a ``memfd`` (a plain temporary file where there is none).  A
forked worker inherits it as is; a worker started by the forkserver or by
spawn gets its descriptor along with its arguments (``DupFd``, the way
multiprocessing passes a ``Connection``).

The worker writes the start time first and the count second, and the parent
reads the count first: a reader that sees the new count may see a newer start
(the worker has moved on), which only makes it wait longer before it looks again.
"""

from __future__ import annotations

import mmap
import os
import weakref
from multiprocessing.reduction import DupFd
from typing import Final, Protocol

__all__ = ["Progress"]

#: Three float64 values: items begun (exact up to 2**53), when the latest began,
#: and how many tries of it came before the one in progress (retries in place).
_SIZE: Final = 24


class _Detachable(Protocol):
    def detach(self) -> int: ...


class Progress:
    """Shared numbers per worker process: items begun, when the latest began, and
    the tries of it before the one in progress."""

    __slots__ = ("__weakref__", "_close_fd", "_fd", "_map", "slots")

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            fd = _anonymous_file()
            os.ftruncate(fd, _SIZE)
        self._fd = fd
        # The descriptor is closed with the object even if close() is never called
        # (a run that fails before its pump starts).
        self._close_fd = weakref.finalize(self, os.close, fd)
        self._map = mmap.mmap(fd, _SIZE)
        #: ``slots[0]``: how many items the worker has begun; ``slots[1]``: when it
        #: began the latest (``time.monotonic()``, or the latest try of it; infinite
        #: between two tries and during a setup); ``slots[2]``: the tries of that
        #: item before the one in progress.  Written by the worker only.
        self.slots = memoryview(self._map).cast("d")

    def reset(self) -> None:
        """Before a new worker process starts: nothing begun yet."""
        self.slots[0] = 0.0
        self.slots[1] = 0.0
        self.slots[2] = 0.0

    def read(self) -> tuple[int, float]:
        """How many items the worker has begun, and when it began the latest."""
        begun = self.slots[0]
        return int(begun), self.slots[1]

    def close(self) -> None:
        """Release the mapping and the descriptor (again: nothing happens)."""
        if self._map.closed:
            return
        self.slots.release()
        self._map.close()
        self._close_fd()

    def __reduce__(self) -> tuple[object, ...]:
        # Only while a worker process is being started (spawn, forkserver): the
        # descriptor travels with the process's arguments.
        return (_attach, (DupFd(self._fd),))


def _attach(fd: _Detachable) -> Progress:
    return Progress(fd.detach())


def _anonymous_file() -> int:
    if hasattr(os, "memfd_create"):
        return os.memfd_create("typeflow-progress", os.MFD_CLOEXEC)
    import tempfile  # pragma: no cover - platforms without memfd (a slow import)

    with tempfile.TemporaryFile() as file:  # pragma: no cover
        return os.dup(file.fileno())
