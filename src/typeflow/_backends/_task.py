"""``backend="task"``: one asyncio task per worker, on the run's event loop.

A worker takes a fair share of what waits in its inbox, at most
:data:`BATCH_LIMIT` items, sized like thread batches (about
:data:`BATCH_SECONDS` of wall time per batch, one item at first), so that slow
calls pass their results on one by one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Sequence

from typeflow._backends._base import (
    BatchSizer,
    Emitter,
    RateLimiter,
    RunEnv,
    fail_batch,
    rate_limiter,
)
from typeflow._runtime._channel import Channel, ChannelAborted, EndOfChannel
from typeflow._runtime._kernel import Envelope, Node, WorkerContext, rows

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
    """The worker tasks of one stage, owned by one supervising coroutine."""

    def __init__(self, future: concurrent.futures.Future[None], loop: asyncio.AbstractEventLoop):
        self._future = future
        self._loop = loop

    def cancel(self) -> None:
        self._future.cancel()

    def join(self, timeout: float) -> bool:
        try:
            self._future.result(timeout)
        except (concurrent.futures.CancelledError, ChannelAborted):
            pass
        except TimeoutError:
            return False
        return True


async def _work(
    node: Node,
    inbox: Channel[Envelope],
    emitter: Emitter,
    index: int,
    limiter: RateLimiter | None,
) -> None:
    kernel = node.kernel
    share = node.options.workers
    ctx = WorkerContext(index)
    sizer = BatchSizer(1 if limiter is not None else BATCH_LIMIT, BATCH_SECONDS)
    clock = time.perf_counter
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
            try:
                outcome = await kernel.aprocess_columns(keys, items, ctx)
            except Exception as exc:  # noqa: BLE001 - not an item's error: fail the batch
                outcome = fail_batch(node, rows(keys, items), exc)
            sizer.record(len(items), clock() - started)
            if (rest := emitter.offer(outcome)) is not None:
                await rest  # the next stage is full
    except (EndOfChannel, ChannelAborted):
        pass
    finally:
        try:
            await ctx.aclose()  # a stateful stage's teardown, also when cancelled
        finally:
            emitter.done()


async def _supervise(node: Node, inbox: Channel[Envelope], emitters: Sequence[Emitter]) -> None:
    limiter = rate_limiter(node)  # shared by the stage's workers
    async with asyncio.TaskGroup() as group:
        for i, emitter in enumerate(emitters):
            worker = _work(node, inbox, emitter, i, limiter)
            group.create_task(worker, name=f"typeflow:{node.name}:{i}")


def start(
    node: Node, inbox: Channel[Envelope], emitters: Sequence[Emitter], env: RunEnv
) -> TaskGroup:
    loop = env.event_loop()
    future = asyncio.run_coroutine_threadsafe(_supervise(node, inbox, emitters), loop)
    return TaskGroup(future, loop)
