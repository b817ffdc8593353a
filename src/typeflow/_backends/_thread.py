"""``backend="thread"``: one thread per worker.

A thread cannot be killed.  When a stage has a ``timeout`` and its function is
a plain (sync) function, a watchdog thread sleeps until the earliest deadline of
the calls in progress.  A call past its deadline is *abandoned*: its item comes
out as a :class:`~typeflow.StageTimeout` failure (or is tried again, if the
stage retries timeouts), a new thread takes the worker's place, and the stuck
thread, whenever its call returns, drops the result and ends.  ``async def``
functions are cancelled at their timeout instead (see the kernel).

Batches are sized per worker by :class:`~typeflow._backends._base.BatchSizer`:
about :data:`BATCH_SECONDS` of work, at most :data:`BATCH_LIMIT` items, one
item at first.  So cheap items travel in big batches while a slow item's result
is passed on as soon as it is ready, and ``close()`` waits for at most a couple
of milliseconds of work (plus the call in progress).  A stage with a timeout
takes one item at a time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from typeflow._backends._base import (
    BatchSizer,
    Emitter,
    RunEnv,
    fail_batch,
    rate_limiter,
)
from typeflow._errors import StageError, StageTimeout
from typeflow._runtime import _retry as retry
from typeflow._runtime._channel import Channel, ChannelAborted, EndOfChannel
from typeflow._runtime._kernel import Envelope, Node, Outcome, WorkerContext, rows

__all__ = ["BATCH_LIMIT", "BATCH_SECONDS", "ThreadGroup", "start"]

#: The most items a thread worker takes from its inbox at once.
BATCH_LIMIT = 256
#: About how long the work of one batch should take, in seconds.
BATCH_SECONDS = 0.002
#: The fewest quick items (under 0.5 ms for all of them) a worker takes when more
#: wait: its fair share may be less, and a few items are not worth two hand-offs.
_LEAST = 64
_LEAST_SECONDS = 0.0005
#: How many of a stage's threads start before ``start()`` returns; a launcher
#: thread starts the others.
_STARTED_AT_ONCE = 8


@dataclass(eq=False)
class _Call:
    """One call under a deadline."""

    envelope: Envelope
    attempt: int
    deadline: float
    abandoned: bool = False


@dataclass(eq=False)
class _Slot:
    """One worker position; a new thread takes it over when a call is abandoned."""

    index: int
    emitter: Emitter
    thread: threading.Thread | None = None
    call: _Call | None = None
    retired: list[threading.Thread] = field(default_factory=list[threading.Thread])


class ThreadGroup:
    """The worker threads of one stage (and its watchdog, when calls have a deadline)."""

    def __init__(self, node: Node, inbox: Channel[Envelope], emitters: Sequence[Emitter]) -> None:
        self._node = node
        self._inbox = inbox
        self._timeout = node.options.timeout if not node.kernel.is_async else None
        self._limiter = rate_limiter(node)
        self._cond = threading.Condition()
        self._stopped = False
        self._slots = [_Slot(i, e) for i, e in enumerate(emitters)]
        self._watchdog: threading.Thread | None = None
        self._launcher: threading.Thread | None = None

    def start(self) -> None:
        # Starting a thread waits until it runs (about 0.1 ms here): a stage of
        # hundreds of I/O workers would keep its first items waiting for all of
        # them.  The first few start now, a launcher thread starts the others
        # while they already work.
        now, later = self._slots[:_STARTED_AT_ONCE], self._slots[_STARTED_AT_ONCE:]
        for slot in now:
            self._launch(slot, None)
        if later:
            self._launcher = threading.Thread(
                target=self._launch_all,
                args=(later,),
                name=f"typeflow:{self._node.name}:launcher",
                daemon=True,
            )
            self._launcher.start()
        if self._timeout is not None:
            self._watchdog = threading.Thread(
                target=self._watch, name=f"typeflow:{self._node.name}:watchdog", daemon=True
            )
            self._watchdog.start()

    def _launch_all(self, slots: list[_Slot]) -> None:
        for i, slot in enumerate(slots):
            with self._cond:
                if self._stopped:  # the run is over: these workers never start
                    for unused in slots[i:]:
                        unused.emitter.done()
                    return
                self._launch(slot, None)

    def _launch(self, slot: _Slot, first: tuple[_Call, BaseException] | None) -> None:
        thread = threading.Thread(
            target=self._work,
            args=(slot, first),
            name=f"typeflow:{self._node.name}:{slot.index}",
            daemon=True,
        )
        slot.thread = thread
        thread.start()

    # -- workers -------------------------------------------------------------

    def _work(self, slot: _Slot, first: tuple[_Call, BaseException] | None) -> None:
        node, inbox, emitter = self._node, self._inbox, slot.emitter
        kernel = node.kernel
        share = node.options.workers
        one_at_a_time = self._timeout is not None or self._limiter is not None
        sizer = BatchSizer(1 if one_at_a_time else BATCH_LIMIT, BATCH_SECONDS)
        clock = time.perf_counter
        ctx = WorkerContext(slot.index)
        replaced = False
        try:
            if first is not None:  # take over from a thread whose call timed out
                call, error = first
                taken_over = self._after_timeout(slot, call, error, ctx)
                if taken_over is None:
                    replaced = True
                    return
                emitter.emit(taken_over)
            while True:
                least = sizer.least(_LEAST, _LEAST_SECONDS) if sizer.limit > 1 else 1
                keys, items = inbox.get_columns(sizer.limit, share, least=least)
                if self._limiter is not None:
                    self._wait(self._limiter.reserve(len(items)))
                if self._timeout is None:
                    started = clock()
                    try:
                        outcome = kernel.process_columns(keys, items, ctx)
                    except BaseException as exc:  # noqa: BLE001 - even SystemExit: the batch
                        # fails, and this thread stays (a worker thread never dies of it)
                        outcome = fail_batch(node, rows(keys, items), exc)
                    sizer.record(len(items), clock() - started)
                else:
                    result = self._timed(slot, (keys[0], items[0]), 1, ctx)
                    if result is None:
                        replaced = True
                        return
                    outcome = result
                emitter.emit(outcome)
        except (EndOfChannel, ChannelAborted):
            pass
        finally:
            ctx.close()
            if not replaced:
                emitter.done()

    def _wait(self, seconds: float) -> None:
        """Wait for a rate limit's slot; the run's end cuts the wait short."""
        if seconds > 0:
            with self._cond:
                if self._cond.wait_for(lambda: self._stopped, seconds):
                    raise ChannelAborted

    def _timed(
        self, slot: _Slot, envelope: Envelope, attempt: int, ctx: WorkerContext
    ) -> Outcome | None:
        """Run one call under the deadline; None if it was abandoned meanwhile."""
        assert self._timeout is not None
        call = _Call(envelope, attempt, time.monotonic() + self._timeout)
        with self._cond:
            slot.call = call
            self._cond.notify()
        try:
            outcome = self._node.kernel.process([envelope], ctx)
        except Exception as exc:  # noqa: BLE001 - not an item's error: fail the batch
            outcome = fail_batch(self._node, [envelope], exc)
        with self._cond:
            if call.abandoned:
                return None
            slot.call = None
        if attempt > 1:
            outcome.retries += attempt - 1
            for _, error in outcome.failed:
                error.attempts += attempt - 1
        return outcome

    def _after_timeout(
        self, slot: _Slot, call: _Call, error: BaseException, ctx: WorkerContext
    ) -> Outcome | None:
        """The first job of a replacement thread: retry the timed-out item, or fail it.

        None means the retry timed out too (and the next replacement carries on).
        """
        options = self._node.options
        envelope = call.envelope
        if options.should_retry(error, call.attempt):
            with self._cond:
                self._cond.wait_for(lambda: self._stopped, retry.delay(options, call.attempt))
                if self._stopped:
                    raise ChannelAborted
            return self._timed(slot, envelope, call.attempt + 1, ctx)
        seq, item = envelope
        failure = StageError(self._node.name, item, error, attempts=call.attempt)
        return Outcome(failed=[(seq, failure)], retries=call.attempt - 1)

    # -- watchdog ------------------------------------------------------------

    def _watch(self) -> None:
        assert self._timeout is not None
        timeout = self._timeout
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                calls = [s.call for s in self._slots if s.call is not None]
                expired = [s for s in self._slots if s.call is not None and s.call.deadline <= now]
                for slot in expired:
                    call = slot.call
                    assert call is not None
                    call.abandoned = True
                    slot.call = None
                    if slot.thread is not None:
                        slot.retired.append(slot.thread)
                    slot.emitter.restarted()
                    self._launch(slot, (call, StageTimeout(self._node.name, timeout)))
                if expired:
                    continue
                next_deadline = min((c.deadline for c in calls), default=None)
                self._cond.wait(None if next_deadline is None else next_deadline - now)

    # -- WorkerGroup -----------------------------------------------------------

    def cancel(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._launcher is not None:  # first: it may still be starting workers
            self._launcher.join(max(0.0, deadline - time.monotonic()))
        threads = [s.thread for s in self._slots if s.thread is not None]
        if self._watchdog is not None:
            threads.append(self._watchdog)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        # Abandoned threads are stuck in user code and cannot be stopped: they
        # are daemon threads and end when their call returns.
        return not any(t.is_alive() for t in threads)


def start(
    node: Node, inbox: Channel[Envelope], emitters: Sequence[Emitter], env: RunEnv
) -> ThreadGroup:
    group = ThreadGroup(node, inbox, emitters)
    group.start()
    return group
