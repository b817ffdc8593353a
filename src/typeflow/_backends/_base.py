"""The protocol between the scheduler and a backend.

A backend starts a stage's workers.  Each worker repeatedly takes a batch from
the stage's inbox, hands it to the stage's kernel and passes the outcome to its
own :class:`Emitter`; when the inbox ends (or the run is aborted) it calls
``emitter.done()`` exactly once and stops.  A replacement worker (after a crash
or a timeout) takes over its predecessor's emitter.  Everything else -- where items come
from, where they go, ordering, failures, shutdown order -- is the scheduler's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from typeflow._errors import StageError
from typeflow._runtime._channel import Channel
from typeflow._runtime._kernel import Envelope, Key, Node, Outcome

if TYPE_CHECKING:
    import asyncio

__all__ = [
    "BatchSizer",
    "Emitter",
    "RatePacer",
    "RunEnv",
    "WorkerBackend",
    "WorkerGroup",
    "fail_batch",
]


class RateLimiter:
    """At most ``rate`` calls per second across all the workers of one stage.

    Each call reserves the next free slot (``1 / rate`` seconds after the one
    before) and is told how long to wait for it, so workers never poll and the
    calls are spread evenly, never in bursts.
    """

    __slots__ = ("_interval", "_lock", "_next")

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = 0.0
        self._lock = threading.Lock()

    def reserve(self, calls: int = 1) -> float:
        """Seconds to wait before making ``calls`` calls."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + calls * self._interval
            return start - now


class RatePacer:
    """Between the tries of a retried call (a ``retry.Pacer``): each try takes a
    slot of the stage's rate, as the first one did."""

    __slots__ = ("attempts_before", "limiter")

    def __init__(self, limiter: RateLimiter | None) -> None:
        self.limiter = limiter
        self.attempts_before = 0

    def resting(self) -> None:
        pass

    def rest(self, seconds: float) -> None:
        time.sleep(seconds)

    async def arest(self, seconds: float) -> None:
        import asyncio

        await asyncio.sleep(seconds)

    def trying(self) -> None:
        if self.limiter is not None:
            time.sleep(self.limiter.reserve(1))

    async def atrying(self) -> None:
        if self.limiter is not None:
            import asyncio

            await asyncio.sleep(self.limiter.reserve(1))


def rate_limiter(node: Node) -> RateLimiter | None:
    """The stage's shared limiter, if it has a ``rate``."""
    rate = node.options.rate
    return RateLimiter(rate) if rate is not None else None


class BatchSizer:
    """How many items one worker takes at once: about ``target`` seconds of work.

    Batching makes cheap items cheap (one hand-off per batch instead of per
    item), but a batch is passed on only when all of it is done, so a batch of
    slow items delays the first results and holds up shutdown.  A worker starts
    with a batch of one item, times each batch, and sets its next limit from a
    running average of the time per item: at most ``target`` seconds of work,
    at most ``cap`` items, and at most twice the last limit (so that one fast
    batch after slow ones does not jump to the cap).  With 10 ms items a worker
    takes one item at a time; with 1 µs items it soon takes ``cap``.

    ``per_item_bytes`` (optional) bounds a batch by size too, for backends that
    copy items between processes.
    """

    __slots__ = ("_bytes", "_cap", "_max_bytes", "_per_item", "_target", "limit")

    def __init__(self, cap: int, target: float, max_bytes: int = 0) -> None:
        self._cap = cap
        self._target = target
        self._max_bytes = max_bytes
        self._per_item = 0.0
        self._bytes = 0.0
        #: The most items to take next time.
        self.limit = 1

    def least(self, count: int, seconds: float) -> int:
        """The fewest items to take when more wait than the fair share: ``count``
        if so many items take under ``seconds`` (splitting them among workers
        costs more hand-offs than it saves), else 1 (slow items are shared out)."""
        return count if self._per_item * count < seconds else 1

    @property
    def per_item(self) -> float:
        """The running average of seconds per item (0.0 before the first batch)."""
        return self._per_item

    def record(self, items: int, seconds: float, nbytes: int = 0) -> None:
        """A batch of ``items`` items took ``seconds`` (and weighed ``nbytes``)."""
        if items <= 0:
            return
        per_item = seconds / items
        # A running average that forgets fast: half the weight on the last batch.
        average = per_item if self._per_item == 0.0 else (self._per_item + per_item) / 2
        self._per_item = average
        # (Comparisons, not min(): this runs once per batch, and a slow item is a batch.)
        limit = 2 * self.limit
        if limit > self._cap:
            limit = self._cap
        if average > 0.0 and (by_time := int(self._target / average)) < limit:
            limit = by_time
        if self._max_bytes:
            per_bytes = nbytes / items
            self._bytes = per_bytes if self._bytes == 0.0 else (self._bytes + per_bytes) / 2
            if self._bytes > 0.0:
                limit = min(limit, int(self._max_bytes / self._bytes))
        self.limit = limit if limit > 1 else 1


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

    def offer(self, outcome: Outcome) -> Coroutine[Any, Any, None] | None:
        """For tasks: pass an outcome on if that needs no waiting (None), else return
        the coroutine that waits for room and finishes the job (to be awaited)."""
        ...

    def offer_one(self, keys: Sequence[Key], value: object) -> Coroutine[Any, Any, None] | None:
        """:meth:`offer` for a batch of one item (``keys``, its key) that made one
        output, ``value``, and nothing else (no outcome made for it)."""
        ...

    def restarted(self) -> None:
        """Count one replacement of this worker (after a crash or a timeout)."""
        ...

    def done(self) -> None:
        """This worker will emit nothing more."""
        ...


class RunEnv(Protocol):
    """What a run offers its backends."""

    #: Whether results are handed out in input order.
    ordered: bool

    def window_full(self) -> bool:
        """Whether every place of the run's window is taken (no input is read until
        a result is handed out)."""
        ...

    def event_loop(self) -> asyncio.AbstractEventLoop:
        """The run's event loop (running in its own thread), started on first use."""
        ...

    def on_shutdown(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` first thing when the run stops (e.g. to abort a channel)."""
        ...

    def start_chain(
        self,
        nodes: tuple[Node, ...],
        first: Channel[Envelope],
        outbox: Outbox,
        label: str = "",
    ) -> list[WorkerGroup]:
        """Start a chain of stages fed by ``first`` whose last stage emits into ``outbox``
        (a branch of a fork); stopped with the run.  Its stages appear in the run's
        statistics as ``label/stage``."""
        ...


class Outbox(Protocol):
    """Where a chain's last stage emits its outcome entries (the run's outbox, or a
    fork's join buffer)."""

    def put_many(self, batch: list[tuple[Key, int, object]]) -> None: ...

    def offer(self, batch: list[tuple[Key, int, object]]) -> bool:
        """Put the batch if that needs no waiting (True); else do nothing (False)."""
        ...

    async def aput_many(self, batch: list[tuple[Key, int, object]]) -> None: ...

    def producer_done(self) -> None: ...


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
