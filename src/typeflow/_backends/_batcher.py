"""The worker of a ``batch`` stage: groups items into lists by size and by time.

A batch stage has no user function to spread over workers, so it always runs as
one thread in the parent, whatever backend the stages around it use.  A list
is emitted when it holds ``size`` items, when ``timeout`` seconds have passed
since its first item arrived (a slow trickle is still flushed), and at the end
of the stream.  The wait for the deadline is a timed wait on the inbox, not a
poll.

Accounting: a list is keyed by its first item; every other item of the list
is announced to the collector as absorbed (a delta of -1 for its root).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from typeflow._backends._base import Emitter, RunEnv
from typeflow._runtime._channel import Channel, ChannelAborted, EndOfChannel
from typeflow._runtime._kernel import Envelope, Kernel, Node, Outcome, WorkerContext, root_of

__all__ = ["BatchKernel", "start"]


class BatchKernel(Kernel):
    """Describes a batch stage; the grouping itself is done by :func:`start`'s worker."""

    __slots__ = ("size", "timeout")

    def __init__(self, name: str, size: int, timeout: float) -> None:
        super().__init__(name, is_async=False)
        self.size = size
        self.timeout = timeout

    def process(self, batch: list[Envelope], ctx: WorkerContext) -> Outcome:
        return _group(batch)

    async def aprocess(self, batch: list[Envelope], ctx: WorkerContext) -> Outcome:
        return _group(batch)


def _group(pending: list[Envelope]) -> Outcome:
    first_key = pending[0][0]
    outcome = Outcome(ok=[(first_key, [item for _, item in pending])])
    outcome.deltas = [(root_of(key), -1) for key, _ in pending[1:]]
    return outcome


class BatchGroup:
    def __init__(self, thread: threading.Thread) -> None:
        self._thread = thread

    def cancel(self) -> None:
        pass  # the aborted channels wake the thread

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


def _work(kernel: BatchKernel, inbox: Channel[Envelope], emitter: Emitter) -> None:
    pending: list[Envelope] = []
    deadline: float | None = None
    try:
        while True:
            try:
                got = inbox.get_many(kernel.size - len(pending), 1, deadline)
            except TimeoutError:
                got = []
            except EndOfChannel:
                if pending:
                    emitter.emit(_group(pending))
                return
            if got and not pending:
                deadline = time.monotonic() + kernel.timeout
            pending += got
            if len(pending) >= kernel.size or (deadline is not None and not got):
                emitter.emit(_group(pending))
                pending, deadline = [], None
    except ChannelAborted:
        pass
    finally:
        emitter.done()


def start(
    node: Node, inbox: Channel[Envelope], emitters: Sequence[Emitter], env: RunEnv
) -> BatchGroup:
    kernel = node.kernel
    assert isinstance(kernel, BatchKernel)
    thread = threading.Thread(
        target=_work, args=(kernel, inbox, emitters[0]), name=f"typeflow:{node.name}", daemon=True
    )
    thread.start()
    return BatchGroup(thread)
