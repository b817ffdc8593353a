"""Which worker is running: :func:`current_worker`, for a stage's code that must know
(one GPU per worker, a log line, a shard of a resource)."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Final

from typeflow._options import Backend

__all__ = ["WorkerInfo", "current_worker", "enter_worker"]


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """The worker that calls a stage's function (or its ``setup`` and ``teardown``).

    Attributes:
        stage: the stage's name, as in errors and statistics.
        index: which of the stage's workers, from 0 to ``workers - 1``.  A worker
            that replaces one (a crashed process, a thread whose call timed out)
            keeps its index.
        workers: how many workers the stage has.
        backend: where the worker runs.
    """

    stage: str
    index: int
    workers: int
    backend: Backend


_current: Final[ContextVar[WorkerInfo | None]] = ContextVar("typeflow_worker", default=None)


def current_worker() -> WorkerInfo | None:
    """The worker running the calling code, or None outside any worker (a stage's
    function called directly, as in a unit test).

    In a stage's function, a stateful stage's ``setup``, ``process`` and
    ``teardown``, on every backend; for a ``shared=True`` stage, ``setup`` sees the
    worker that happens to set the object up, and ``teardown`` the last to end.

    Example:
        >>> from typeflow import current_worker, stage
        >>> @stage(workers=2, name="tag")
        ... def tag(x: int) -> str:
        ...     worker = current_worker()
        ...     assert worker is not None
        ...     return f"{worker.stage}/{worker.workers}"
        >>> [r.unwrap() for r in tag.run([1, 2])]
        ['tag/2', 'tag/2']
        >>> print(current_worker())
        None
    """
    return _current.get()


def enter_worker(info: WorkerInfo) -> None:
    """Called by each backend at the start of a worker, in that worker's own
    context (its thread, its task, its process)."""
    _current.set(info)
