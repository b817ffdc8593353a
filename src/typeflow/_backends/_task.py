"""``backend="task"``: one asyncio task per worker, on the run's event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence

from typeflow._backends._base import Emitter, RunEnv, fail_batch
from typeflow._runtime._channel import Channel, ChannelAborted, EndOfChannel
from typeflow._runtime._kernel import Envelope, Node, WorkerContext

__all__ = ["BATCH_LIMIT", "TaskGroup", "start"]

#: The most items a task worker takes from its inbox at once.
BATCH_LIMIT = 64


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


async def _work(node: Node, inbox: Channel[Envelope], emitter: Emitter, index: int) -> None:
    kernel = node.kernel
    share = node.options.workers
    ctx = WorkerContext(index)
    try:
        while True:
            batch = await inbox.aget_many(BATCH_LIMIT, share)
            try:
                outcome = await kernel.aprocess(batch, ctx)
            except Exception as exc:  # noqa: BLE001 - not an item's error: fail the batch
                outcome = fail_batch(node, batch, exc)
            await emitter.aemit(outcome)
    except (EndOfChannel, ChannelAborted):
        pass
    finally:
        emitter.done()


async def _supervise(node: Node, inbox: Channel[Envelope], emitters: Sequence[Emitter]) -> None:
    async with asyncio.TaskGroup() as group:
        for i, emitter in enumerate(emitters):
            group.create_task(_work(node, inbox, emitter, i), name=f"typeflow:{node.name}:{i}")


def start(
    node: Node, inbox: Channel[Envelope], emitters: Sequence[Emitter], env: RunEnv
) -> TaskGroup:
    loop = env.event_loop()
    future = asyncio.run_coroutine_threadsafe(_supervise(node, inbox, emitters), loop)
    return TaskGroup(future, loop)
