"""``backend="task"``: one asyncio task per worker, on the run's event loop.

A worker takes a fair share of what waits in its inbox, at most
:data:`BATCH_LIMIT` items, sized like thread batches (about
:data:`BATCH_SECONDS` of wall time per batch, one item at first), so that slow
calls pass their results on one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from typeflow._backends._base import (
    BatchSizer,
    Emitter,
    RateLimiter,
    RatePacer,
    RunEnv,
    fail_batch,
    rate_limiter,
)
from typeflow._runtime._channel import Channel, ChannelAborted, EndOfChannel
from typeflow._runtime._kernel import (
    Envelope,
    Node,
    SharedScope,
    WorkerContext,
    rows,
    until_done,
)
from typeflow._worker import WorkerInfo, enter_worker

__all__ = ["BATCH_LIMIT", "BATCH_SECONDS", "TaskGroup", "start"]

#: The most items a task worker takes from its inbox at once.
BATCH_LIMIT = 64
#: About how long one batch should take, in seconds.
BATCH_SECONDS = 0.002
#: The fewest quick items (under 0.5 ms for all of them) a worker takes when more
#: wait: its fair share may be less, and a few items are not worth two hand-offs.
_LEAST = 64
_LEAST_SECONDS = 0.0005


class TaskGroup:
    """The worker tasks of one stage, owned by one supervising task on the run's loop.

    :meth:`join` waits for that task itself, not for a future that says it was
    cancelled: a cancelled worker still runs its stateful stage's ``teardown``,
    which may await (close a session), and the run waits for it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, work: Coroutine[Any, Any, None]) -> None:
        self._loop = loop
        self._task: asyncio.Task[None] | None = None
        self._cancelled = False
        self._ended = threading.Event()
        self._error: BaseException | None = None
        loop.call_soon_threadsafe(self._begin, work)

    def _begin(self, work: Coroutine[Any, Any, None]) -> None:  # on the loop
        if self._cancelled:  # before it began: nothing to tear down
            work.close()
            self._ended.set()
            return
        self._task = self._loop.create_task(work)
        self._task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:  # on the loop
        if not task.cancelled():
            self._error = task.exception()
        self._ended.set()

    def cancel(self) -> None:
        def cancel() -> None:  # on the loop
            self._cancelled = True
            if self._task is not None:
                self._task.cancel()

        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing runs on it
            self._loop.call_soon_threadsafe(cancel)

    def join(self, timeout: float) -> bool:
        if not self._ended.wait(timeout):
            return False
        if self._error is not None and not isinstance(self._error, ChannelAborted):
            raise self._error
        return True


async def _work(
    node: Node,
    inbox: Channel[Envelope],
    emitter: Emitter,
    index: int,
    limiter: RateLimiter | None,
    scope: SharedScope,
) -> None:
    kernel = node.kernel
    share = node.options.workers
    enter_worker(WorkerInfo(node.name, index, share, "task"))  # this task's own context
    ctx = WorkerContext(index, scope)
    if limiter is not None:
        ctx.pacer = RatePacer(limiter)
    sizer = BatchSizer(1 if limiter is not None else BATCH_LIMIT, BATCH_SECONDS)
    clock = time.perf_counter
    one = kernel.one
    try:
        while True:
            least = sizer.least(_LEAST, _LEAST_SECONDS) if sizer.limit > 1 else 1
            # Items usually wait: take them without a coroutine, else wait for some.
            keys, items = inbox.take_columns_nowait(sizer.limit, share, least)
            if not items:
                keys, items = await inbox.aget_columns(sizer.limit, share, least=least)
            if limiter is not None and (delay := limiter.reserve(len(items))) > 0:
                await asyncio.sleep(delay)  # a rate limit's slot (cancellable)
            started = clock()
            if one is not None and len(items) == 1:
                # One item (slow ones come one at a time): the call, and its value
                # straight on, without a batch's outcome; about a third of the
                # worker's own cost per item.
                try:
                    value = await one(items[0])
                except BaseException as exc:  # noqa: BLE001 - the item's Failure; one_failed re-raises the rest
                    rest = emitter.offer(kernel.one_failed(keys[0], items[0], exc))
                else:
                    rest = emitter.offer_one(keys, value)
                sizer.record(1, clock() - started)
            else:
                try:
                    outcome = await kernel.aprocess_columns(keys, items, ctx)
                except Exception as exc:  # noqa: BLE001 - not an item's error: fail the batch
                    outcome = fail_batch(node, rows(keys, items), exc)
                sizer.record(len(items), clock() - started)
                rest = emitter.offer(outcome)
                # A failure's traceback may hold this frame (as the kernel's caller)
                # past its end: it must not hold the failures (see release_callers).
                del outcome
            if rest is not None:
                await rest  # the next stage is full
    except (EndOfChannel, ChannelAborted):
        pass
    finally:
        try:
            if ctx.state is None and scope.state is None:
                # Nothing to tear down (a function's stage, or a stateful one that
                # never set up): no task for it, which costs 200 workers a few
                # milliseconds at the end of every run.
                scope.leave(ctx)
            else:
                # A stateful stage's teardown (a shared one's by the last worker),
                # also when cancelled.
                await _to_the_end(_close(ctx, scope))
        finally:
            emitter.done()


async def _close(ctx: WorkerContext, scope: SharedScope) -> None:
    try:
        await scope.aleave(ctx)
    finally:
        await ctx.aclose()


async def _to_the_end(work: Coroutine[Any, Any, None]) -> None:
    """Await ``work`` until it ends, even if this task is cancelled meanwhile (a run
    that stops cancels its workers, then waits for them: a teardown should close
    what it opened, not be cut short at its first ``await``).  The run's join
    bounds the wait; a cancellation that came meanwhile is raised afterwards."""
    if await until_done(work):
        raise asyncio.CancelledError


async def _supervise(node: Node, inbox: Channel[Envelope], emitters: Sequence[Emitter]) -> None:
    limiter = rate_limiter(node)  # shared by the stage's workers
    scope = SharedScope(len(emitters))  # and so is a shared stateful stage's object
    try:
        async with asyncio.TaskGroup() as group:
            for i, emitter in enumerate(emitters):
                worker = _work(node, inbox, emitter, i, limiter, scope)
                group.create_task(worker, name=f"typeflow:{node.name}:{i}")
    finally:
        await _to_the_end(scope.aclose())


def start(
    node: Node, inbox: Channel[Envelope], emitters: Sequence[Emitter], env: RunEnv
) -> TaskGroup:
    return TaskGroup(env.event_loop(), _supervise(node, inbox, emitters))
