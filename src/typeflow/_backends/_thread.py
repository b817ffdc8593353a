"""``backend="thread"``: one thread per worker."""

from __future__ import annotations

import threading
import time

from typeflow._backends._base import Emitter, RunEnv, fail_batch
from typeflow._runtime._channel import Channel, ChannelAborted, EndOfChannel
from typeflow._runtime._kernel import Envelope, Node, WorkerContext

__all__ = ["BATCH_LIMIT", "ThreadGroup", "start"]

#: The most items a thread worker takes from its inbox at once.
BATCH_LIMIT = 256


class ThreadGroup:
    """The worker threads of one stage."""

    def __init__(self, threads: list[threading.Thread]) -> None:
        self.threads = threads

    def cancel(self) -> None:
        # Threads cannot be interrupted: the aborted channels stop each one as
        # soon as its current batch is done.
        pass

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)


def _work(node: Node, inbox: Channel[Envelope], emitter: Emitter, index: int) -> None:
    kernel = node.kernel
    share = node.options.workers
    ctx = WorkerContext(index)
    try:
        while True:
            batch = inbox.get_many(BATCH_LIMIT, share)
            try:
                outcome = kernel.process(batch, ctx)
            except Exception as exc:  # noqa: BLE001 - not an item's error: fail the batch
                outcome = fail_batch(node, batch, exc)
            emitter.emit(outcome)
    except (EndOfChannel, ChannelAborted):
        pass
    finally:
        ctx.close()
        emitter.done()


def start(node: Node, inbox: Channel[Envelope], emitter: Emitter, env: RunEnv) -> ThreadGroup:
    threads = [
        threading.Thread(
            target=_work,
            args=(node, inbox, emitter, i),
            name=f"typeflow:{node.name}:{i}",
            daemon=True,
        )
        for i in range(node.options.workers)
    ]
    for t in threads:
        t.start()
    return ThreadGroup(threads)
