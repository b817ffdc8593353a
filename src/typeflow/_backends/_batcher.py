"""The worker of a ``batch`` stage: groups items into lists by size and by time.

A batch stage has no user function to spread over workers, so it always runs as
one thread in the parent, whatever backend the stages around it use.  A list
is emitted when it holds ``size`` items, when ``timeout`` seconds have passed
since its first item arrived (a slow trickle is still flushed), and at the end
of the stream.  The wait for the deadline is a timed wait on the inbox, not a
poll.

Accounting: a list is keyed by its first item; every other item of the list
is announced to the collector as absorbed (a delta of -1 for its root) as soon
as it arrives, so that only a list's first item waits for the list.

In an ordered run, a list whose first item is late (older than an item of a
list already passed on: several workers upstream) holds back every result
after it; once the run's window is full, no more input is read and the list
could only be flushed by its timeout.  It is flushed then instead.
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


def _work(kernel: BatchKernel, inbox: Channel[Envelope], emitter: Emitter, env: RunEnv) -> None:
    pending: list[Envelope] = []
    deadline: float | None = None
    #: The newest input item in a list passed on so far.
    newest = -1
    try:
        while True:
            try:
                got = inbox.get_many(kernel.size - len(pending), 1, deadline)
            except TimeoutError:
                got = []
            except EndOfChannel:
                if pending:
                    emitter.emit(_flush(pending))
                return
            if got:
                absorbed = got if pending else got[1:]
                if absorbed:
                    emitter.emit(Outcome(deltas=[(root_of(key), -1) for key, _ in absorbed]))
                if not pending:
                    deadline = time.monotonic() + kernel.timeout
                pending += got
            if not pending:
                continue
            late = env.ordered and root_of(pending[0][0]) < newest and env.window_full()
            if len(pending) >= kernel.size or (deadline is not None and not got) or late:
                newest = max(newest, max(root_of(key) for key, _ in pending))
                emitter.emit(_flush(pending))
                pending, deadline = [], None
    except ChannelAborted:
        pass
    finally:
        emitter.done()


def _flush(pending: list[Envelope]) -> Outcome:
    """The list, keyed by its first item (the others were announced absorbed)."""
    return Outcome(ok=[(pending[0][0], [item for _, item in pending])])


def start(
    node: Node, inbox: Channel[Envelope], emitters: Sequence[Emitter], env: RunEnv
) -> BatchGroup:
    kernel = node.kernel
    assert isinstance(kernel, BatchKernel)
    thread = threading.Thread(
        target=_work,
        args=(kernel, inbox, emitters[0], env),
        name=f"typeflow:{node.name}",
        daemon=True,
    )
    thread.start()
    return BatchGroup(thread)
