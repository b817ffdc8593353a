"""The protocol between the scheduler and a backend.

A backend starts a stage's workers.  Each worker repeatedly takes a batch from
the stage's inbox, hands it to the stage's kernel and passes the outcome to its
own :class:`Emitter`; when the inbox ends (or the run is aborted) it calls
``emitter.done()`` exactly once and stops.  A replacement worker (after a crash
or a timeout) takes over its predecessor's emitter.  Everything else -- where items come
from, where they go, ordering, failures, shutdown order -- is the scheduler's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from typeflow._errors import StageError
from typeflow._runtime._channel import Channel
from typeflow._runtime._kernel import Envelope, Node, Outcome

__all__ = ["Emitter", "RunEnv", "WorkerBackend", "WorkerGroup", "fail_batch"]


def fail_batch(node: Node, batch: list[Envelope], exc: BaseException) -> Outcome:
    """Every item of ``batch`` fails with ``exc``: an error outside any one item's call.

    Kernels turn an item's exception into that item's failure themselves; this
    is the guard for everything else (a worker process that cannot start, a bug
    in typeflow), so that no item is ever lost and no stage stops consuming.
    """
    return Outcome(failed=[(seq, StageError(node.name, item, exc)) for seq, item in batch])


class Emitter(Protocol):
    """Where a worker sends what its kernel made of a batch."""

    def emit(self, outcome: Outcome) -> None:
        """Pass an outcome on, waiting while the next stage is full."""
        ...

    async def aemit(self, outcome: Outcome) -> None:
        """The awaitable twin of :meth:`emit`."""
        ...

    def restarted(self) -> None:
        """Count one replacement of this worker (after a crash or a timeout)."""
        ...

    def done(self) -> None:
        """This worker will emit nothing more."""
        ...


class RunEnv(Protocol):
    """What a run offers its backends."""

    def event_loop(self) -> asyncio.AbstractEventLoop:
        """The run's event loop (running in its own thread), started on first use."""
        ...


class WorkerGroup(Protocol):
    """The running workers of one stage."""

    def cancel(self) -> None:
        """Stop now: called after the run's channels are aborted.  Must not block."""
        ...

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every worker to end; True if all did."""
        ...


class WorkerBackend(Protocol):
    """A backend module: starts the workers of one stage."""

    def start(
        self, node: Node, inbox: Channel[Envelope], emitters: Sequence[Emitter], env: RunEnv
    ) -> WorkerGroup:
        """Start one worker per emitter; each worker calls its emitter's ``done`` once."""
        ...
