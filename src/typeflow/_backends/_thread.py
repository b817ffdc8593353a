"""``backend="thread"``: one thread per worker.

A thread cannot be killed.  When a stage has a ``timeout`` and its function is
a plain (sync) function, a watchdog thread sleeps until the earliest deadline of
the calls in progress.  Workers still take batches; they run them one call at
a time and note when each call began, so each call has its own deadline.  A
call past its deadline is *abandoned*: its item comes out as a
:class:`~typeflow.StageTimeout` failure (or is tried again, if the stage
retries timeouts), a new thread takes the worker's place (with the results of
the batch so far, and the items after the stuck one), and the stuck thread,
whenever its call returns, drops the result and ends.  ``async def`` functions
are cancelled at their timeout instead (see the kernel).

Batches are sized per worker by :class:`~typeflow._backends._base.BatchSizer`:
about :data:`BATCH_SECONDS` of work, at most :data:`BATCH_LIMIT` items, one
item at first.  So cheap items travel in big batches while a slow item's result
is passed on as soon as it is ready, and ``close()`` waits for at most a couple
of milliseconds of work (plus the call in progress).  A stage with a rate
limit takes one item at a time.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from typeflow._backends._base import (
    BatchSizer,
    Emitter,
    RatePacer,
    RunEnv,
    fail_batch,
    rate_limiter,
)
from typeflow._errors import StageError, StageTimeout
from typeflow._runtime import _retry as retry
from typeflow._runtime._channel import Channel, ChannelAborted, EndOfChannel
from typeflow._runtime._kernel import (
    Envelope,
    Gather,
    Key,
    Node,
    Outcome,
    SharedScope,
    WorkerContext,
    WorkerExit,
    rows,
)
from typeflow._worker import WorkerInfo, enter_worker

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


class _Batch:
    """A batch under deadlines, run one call at a time by its worker thread.

    ``gather.done`` and ``began`` move together, under the slot's lock: the
    call on ``items[gather.done]`` began at ``began``.  The watchdog reads them when a deadline
    passes; once it sets ``abandoned`` (under the same lock) the stuck thread
    touches nothing here again, and its replacement takes over what is done.
    """

    __slots__ = ("abandoned", "attempt", "began", "gather", "items", "keys", "retried")

    def __init__(
        self, keys: Sequence[Key], items: Sequence[object], attempt: int, began: float
    ) -> None:
        self.keys = keys
        self.items = items
        #: Which try this is (more than 1 only for a timed-out item tried again alone).
        self.attempt = attempt
        #: When the try in progress began; infinite between two tries of a call
        #: (the backoff of a retry is not part of any try's time).
        self.began = began
        #: Tries of the call in progress before the current one (retries in place).
        self.retried = 0
        self.gather = Gather(keys)
        self.abandoned: bool = False

    def running(self) -> bool:
        """Whether a call of the batch is still in progress (a method: it changes
        under the checker's feet, so it must not be narrowed like an attribute)."""
        return self.gather.done < len(self.items)


class _Stop(WorkerExit):
    """Raised by a pacer into a retry loop: the thread's call was abandoned, or the
    run stops.  Never an item's failure."""


class _ThreadPacer(RatePacer):
    """A thread worker's: the backoff between tries and the wait for a rate slot
    end early if the run stops (no call is made after the run was closed)."""

    __slots__ = ("_group",)

    def __init__(self, group: ThreadGroup) -> None:
        super().__init__(group.limiter)
        self._group = group

    def rest(self, seconds: float) -> None:
        self._group.wait_unless_stopped(seconds)

    async def arest(self, seconds: float) -> None:
        # An async stage on a thread: the worker's own event loop waits for the
        # run's stop in its executor (only between two tries of a failed call).
        import asyncio

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._group.wait_unless_stopped, seconds)

    def trying(self) -> None:
        self._group.wait_for_rate(1)


class _TimedPacer(_ThreadPacer):
    """The same for a call under a deadline: none runs between two tries, and each
    try's runs from when it begins."""

    __slots__ = ("_batch", "_slot")

    def __init__(self, group: ThreadGroup, slot: _Slot, batch: _Batch) -> None:
        super().__init__(group)
        self._slot, self._batch = slot, batch
        self.attempts_before = batch.attempt - 1

    def resting(self) -> None:
        batch = self._batch
        with self._slot.lock:
            if batch.abandoned:
                raise _Stop
            batch.began = math.inf

    def trying(self) -> None:
        super().trying()
        self._group.began_again(self._slot, self._batch)


class _Work(NamedTuple):
    """Items a replacement thread must see to before it takes new ones."""

    keys: Sequence[Key]
    items: Sequence[object]
    attempt: int
    #: Not None: one item whose call timed out on try ``attempt`` (retry or fail it).
    error: BaseException | None


@dataclass(eq=False)
class _Slot:
    """One worker position; a new thread takes it over when a call is abandoned."""

    index: int
    emitter: Emitter
    thread: threading.Thread | None = None
    batch: _Batch | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    retired: list[threading.Thread] = field(default_factory=list[threading.Thread])
    #: Left by a replacement whose own call timed out (see ``_take_over``).
    backlog: list[_Work] = field(default_factory=list[_Work])


class ThreadGroup:
    """The worker threads of one stage (and its watchdog, when calls have a deadline)."""

    def __init__(self, node: Node, inbox: Channel[Envelope], emitters: Sequence[Emitter]) -> None:
        self._node = node
        # What the workers share (a shared stateful stage's object).
        self._scope = SharedScope(len(emitters))
        self._inbox = inbox
        self._timeout = node.options.timeout if not node.kernel.is_async else None
        self.limiter = rate_limiter(node)
        self._cond = threading.Condition()
        self._stopped = False
        self._slots = [_Slot(i, e) for i, e in enumerate(emitters)]
        self._watchdog: threading.Thread | None = None
        #: The watchdog waits for no deadline: a new batch must wake it.
        self._watchdog_idle = False
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
                if not self._stopped:
                    self._launch(slot, None)
                    continue
            # The run is over: these workers never start (the last to leave a
            # shared object tears it down, on a context of its own).
            for unused in slots[i:]:
                ctx = WorkerContext(unused.index)
                try:
                    self._scope.leave(ctx)
                finally:
                    ctx.close()
                    unused.emitter.done()
            return

    def _launch(self, slot: _Slot, first: tuple[_Batch, BaseException] | None) -> None:
        thread = threading.Thread(
            target=self._work,
            args=(slot, first),
            name=f"typeflow:{self._node.name}:{slot.index}",
            daemon=True,
        )
        slot.thread = thread
        thread.start()

    # -- workers -------------------------------------------------------------

    def _work(self, slot: _Slot, first: tuple[_Batch, BaseException] | None) -> None:
        node, inbox, emitter = self._node, self._inbox, slot.emitter
        kernel = node.kernel
        share = node.options.workers
        sizer = BatchSizer(1 if self.limiter is not None else BATCH_LIMIT, BATCH_SECONDS)
        clock = time.perf_counter
        enter_worker(WorkerInfo(node.name, slot.index, share, "thread"))
        ctx = WorkerContext(slot.index, self._scope)
        ctx.pacer = _ThreadPacer(self)  # used only when a call is tried again
        replaced = False
        try:
            if first is not None:
                taken_over = self._take_over(slot, *first, ctx)
                first = None  # (as for outcome, below)
                if not taken_over:
                    replaced = True
                    return
            while True:
                least = sizer.least(_LEAST, _LEAST_SECONDS) if sizer.limit > 1 else 1
                keys, items = inbox.get_columns(sizer.limit, share, least=least)
                self.wait_for_rate(len(items))
                started = clock()
                if self._timeout is None:
                    try:
                        outcome = kernel.process_columns(keys, items, ctx)
                    except _Stop:
                        raise  # the run stops while a retry waits for its rate slot
                    except BaseException as exc:  # noqa: BLE001 - even SystemExit: the batch
                        # fails, and this thread stays (a worker thread never dies of it)
                        outcome = fail_batch(node, rows(keys, items), exc)
                else:
                    result = self._timed(slot, keys, items, 1, ctx)
                    if result is None:
                        replaced = True
                        return
                    outcome = result
                    del result
                sizer.record(len(items), clock() - started)
                emitter.emit(outcome)
                # A failure's traceback may hold this frame (as the kernel's caller)
                # past its end: it must not hold the failures (see release_callers).
                del outcome
        except (EndOfChannel, ChannelAborted, _Stop):
            pass
        finally:
            try:
                try:
                    self._scope.leave(ctx)
                finally:
                    ctx.close()
            finally:
                if not replaced:
                    emitter.done()

    def wait_for_rate(self, calls: int) -> None:
        """Wait for the rate limit's slots for ``calls`` more calls (none without one);
        the run's end cuts the wait short (``_Stop``)."""
        if self.limiter is None:
            return
        self.wait_unless_stopped(self.limiter.reserve(calls))

    def wait_unless_stopped(self, seconds: float) -> None:
        """Wait ``seconds``; ``_Stop`` if the run stops meanwhile."""
        if seconds > 0:
            with self._cond:
                if self._cond.wait_for(lambda: self._stopped, seconds):
                    raise _Stop

    def began_again(self, slot: _Slot, batch: _Batch) -> None:
        """A new try of the call in progress begins: its deadline counts from now."""
        with self._cond:
            with slot.lock:
                if batch.abandoned:
                    raise _Stop
                batch.began = time.monotonic()
                batch.retried += 1
            if self._watchdog_idle:
                self._cond.notify()

    def _timed(
        self,
        slot: _Slot,
        keys: Sequence[Key],
        items: Sequence[object],
        attempt: int,
        ctx: WorkerContext,
    ) -> Outcome | None:
        """Run a batch one call at a time, each under its own deadline; None if a call
        was abandoned meanwhile (the thread that replaced this one carries on)."""
        clock, kernel, lock = time.monotonic, self._node.kernel, slot.lock
        kernel.prepare(ctx)  # a stateful stage's setup: before the first call's deadline
        batch = _Batch(keys, items, attempt, clock())
        gather = batch.gather
        paced, ctx.pacer = ctx.pacer, _TimedPacer(self, slot, batch)
        with self._cond:
            slot.batch = batch
            if self._watchdog_idle:  # otherwise it wakes by an earlier deadline anyway
                self._cond.notify()
        abandoned = False
        try:
            for key, item in zip(keys, items, strict=True):
                try:
                    more = kernel.process_columns((key,), (item,), ctx)
                except _Stop:
                    abandoned = True  # between two tries (or the run stops)
                    break
                except Exception as exc:  # noqa: BLE001 - not an item's error: fail the item
                    more = fail_batch(self._node, [(key, item)], exc)
                with lock:
                    if batch.abandoned:
                        abandoned = True
                        break
                    gather.add(more)
                    batch.began = clock()
                    batch.retried = 0
        finally:
            ctx.pacer = paced
        if abandoned:
            # The thread that took over emits what the batch did; this frame, which
            # its failures' tracebacks may hold, must not hold them (nor the
            # dropped outcome of a call that returned too late).
            del batch, gather
            more = Outcome()
            return None
        outcome = gather.outcome()
        if attempt > 1:
            outcome.retries += attempt - 1
            for _, error in outcome.failed:
                error.attempts += attempt - 1
        return outcome

    def _take_over(
        self, slot: _Slot, batch: _Batch, error: BaseException, ctx: WorkerContext
    ) -> bool:
        """The first job of a thread that replaces one whose call timed out: pass on
        what its batch had done, retry or fail the stuck item, run the items after it,
        then what an earlier replacement of this slot had left (``slot.backlog``).

        False if a call timed out again: the next replacement carries the backlog on.
        """
        emitter, done = slot.emitter, batch.gather.done
        if done:
            emitter.emit(batch.gather.outcome())
        keys, items = batch.keys, batch.items
        tried = batch.attempt + batch.retried  # retries in place count too
        ahead = [_Work(keys[done : done + 1], items[done : done + 1], tried, error)]
        if done + 1 < len(items):
            ahead.append(_Work(keys[done + 1 :], items[done + 1 :], 1, None))
        backlog = slot.backlog
        backlog[:0] = ahead
        options = self._node.options
        while backlog:
            work = backlog.pop(0)
            attempt = work.attempt
            if work.error is not None:  # one item that timed out
                if not options.should_retry(work.error, attempt):
                    key, item = work.keys[0], work.items[0]
                    failure = StageError(self._node.name, item, work.error, attempts=attempt)
                    emitter.emit(Outcome(failed=[(key, failure)], retries=attempt - 1))
                    continue
                with self._cond:
                    self._cond.wait_for(lambda: self._stopped, retry.delay(options, attempt))
                    if self._stopped:
                        raise ChannelAborted
                attempt += 1
            outcome = self._timed(slot, work.keys, work.items, attempt, ctx)
            if outcome is None:
                return False
            emitter.emit(outcome)
            del outcome  # (as in _work)
        return True

    # -- watchdog ------------------------------------------------------------

    def _watch(self) -> None:
        assert self._timeout is not None
        timeout = self._timeout
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                next_deadline: float | None = None
                for slot in self._slots:
                    batch = slot.batch
                    if batch is None or not batch.running() or batch.began == math.inf:
                        continue  # no call, or between two tries of one (it wakes us)
                    deadline = batch.began + timeout
                    if deadline > now:
                        if next_deadline is None or deadline < next_deadline:
                            next_deadline = deadline
                        continue
                    with slot.lock:  # the worker may finish the call right now
                        if batch.abandoned or not batch.running() or batch.began + timeout > now:
                            continue
                        # The replacement counts before the abandoned thread can see
                        # that it was and leave: a shared object is not torn down.
                        self._scope.enter()
                        batch.abandoned = True
                    slot.batch = None
                    if slot.thread is not None:
                        slot.retired.append(slot.thread)
                    slot.emitter.restarted()
                    self._launch(slot, (batch, StageTimeout(self._node.name, timeout)))
                if next_deadline is not None and next_deadline <= time.monotonic():
                    continue  # a call finished just as it was looked at: look again
                self._watchdog_idle = next_deadline is None
                self._cond.wait(None if next_deadline is None else next_deadline - now)
                self._watchdog_idle = False

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
        if self._watchdog is not None:
            self._watchdog.join(max(0.0, deadline - time.monotonic()))
        ended = True
        for slot in self._slots:
            thread = slot.thread
            if thread is None:
                continue
            # A call under a timeout is waited for until its own deadline, no longer:
            # past it the thread would have been abandoned anyway.
            thread.join(max(0.0, min(deadline, self._call_deadline(slot)) - time.monotonic()))
            if thread.is_alive():
                ended = False
                with slot.lock:
                    if slot.batch is not None:
                        slot.batch.abandoned = True  # it drops whatever it still makes
        # Abandoned threads are stuck in user code and cannot be stopped: they
        # are daemon threads and end when their call returns.
        return ended

    def _call_deadline(self, slot: _Slot) -> float:
        """When the call a worker is in passes its deadline (infinite: no timeout)."""
        batch = slot.batch
        if self._timeout is None or batch is None:
            return math.inf
        return batch.began + self._timeout


def start(
    node: Node, inbox: Channel[Envelope], emitters: Sequence[Emitter], env: RunEnv
) -> ThreadGroup:
    group = ThreadGroup(node, inbox, emitters)
    group.start()
    return group
