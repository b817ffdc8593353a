"""The main loop of a process worker.  Imported by the forkserver ahead of time.

A worker receives ``(seqs, items)`` -- a batch, its positions and its values
apart, which pickles smaller than a list of pairs -- runs the kernel on it and
replies with :data:`Reply`: the outcome (its failures apart), and how long the
kernel took, from which the parent sizes the next batches.  ``None`` asks it to
stop.  Messages go through :class:`~typeflow._backends._wire.Wire`.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import cast

from typeflow._backends._progress import Progress
from typeflow._backends._wire import Endpoint, Undecodable, Wire, lift
from typeflow._errors import short_str
from typeflow._runtime._kernel import (
    Gather,
    Kernel,
    Key,
    Outcome,
    SetupFailed,
    WorkerContext,
    WorkerExit,
    release_callers,
    root_of,
)
from typeflow._worker import WorkerInfo, enter_worker

__all__ = ["READY", "SET_UP", "SLOT", "RawFailure", "Reply", "Unreadable", "child_main"]

#: The first message of a worker process: it is up and holds the kernel.
READY = b"ready"
#: Sent by a timed worker once a stateful stage's setup is over (see ``_tracked``),
#: or a retried call's next try begins (see ``_Pacer``): the deadline counts from
#: now.  A reply is always a tuple, so this string never stands for one.
SET_UP = "set up"
#: Sent by a worker of a rate-limited stage before it tries a call again: the
#: parent, which holds the stage's rate limiter, replies with the seconds to wait
#: for the try's slot (see ``_Pacer``).
SLOT = "slot"


class Unreadable:
    """The reply to a batch that arrived whole but does not unpickle in the worker
    (a class the worker cannot import, say): the parent sends its items again
    one at a time, to find which."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


#: A failure as it crosses back to the parent: position, exception, formatted
#: traceback, number of tries.
RawFailure = tuple[Key, BaseException, str, int]
#: What a worker process sends back for a batch: the outcome without its
#: failures, the failures as :data:`RawFailure`, and the seconds the kernel took.
Reply = tuple[Outcome, list[RawFailure], float]


def child_main(
    conn: Endpoint,
    kernel_bytes: bytes | None,
    index: int,
    inherited: Sequence[Endpoint] = (),
    kernel: Kernel | None = None,
    handshake: bool = True,
    progress: Progress | None = None,
    rated: bool = False,
    info: WorkerInfo | None = None,
) -> None:
    """Serve batches on ``conn`` until told to stop or the parent goes away.

    A worker forked straight from the parent gets its ``kernel`` as is and
    closes the parent's ends of the worker sockets it ``inherited`` (so that
    each worker sees its socket close when the parent dies); the others get
    ``kernel_bytes`` and say READY once they have unpickled it (a forked worker
    has nothing to wait for: ``handshake`` is False).  Under a timeout the
    worker writes down in ``progress`` which item it is on (see
    :mod:`~typeflow._backends._progress`).  A ``rated`` stage's retries ask
    the parent for their slots of the rate.
    """
    # Ctrl-C reaches the whole process group; the parent decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM (a cancelled run) ends the current call; the finally below still
    # tears a stateful stage down before the process exits.  The handler replaces
    # the run's own, which a forked worker inherits; the signal is held back
    # (a forked worker's parent holds it while forking) until the worker is set
    # up, so that a stop during the start lands in _serve, where it is expected.
    held = {signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    signal.signal(signal.SIGTERM, _terminate)
    ctx: WorkerContext | None = None
    wire: Wire | None = None
    try:
        sys.unraisablehook = _quiet_worker_exit
        for other in inherited:
            other.close()
        if kernel is None:
            assert kernel_bytes is not None
            kernel = pickle.loads(kernel_bytes)
        assert kernel is not None
        if info is not None:
            enter_worker(info)
        ctx = WorkerContext(index)
        wire = Wire(conn, worker=True)
        if handshake:
            # Started by spawn or the forkserver: ``conn`` is a multiprocessing Connection.
            from multiprocessing.connection import Connection

            assert isinstance(conn, Connection)
            conn.send_bytes(READY)  # the parent starts its clock for timeouts from here
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
        _serve(kernel, ctx, wire, progress, rated)
    except WorkerExit:
        pass  # told to stop: the teardown below is all that is left to do
    finally:
        # The end: the teardown runs whole, and a SIGTERM from here on (a run that
        # stops while this process exits) is held back for good -- the process
        # ends with its own exit, no WorkerExit out of it.
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
        if ctx is not None:
            with contextlib.suppress(WorkerExit):  # one that landed just before the block
                ctx.close()
        if wire is not None:
            wire.close()
        conn.close()


def _serve(
    kernel: Kernel, ctx: WorkerContext, wire: Wire, progress: Progress | None, rated: bool
) -> None:
    """Batches in, replies out, until the parent says stop or is gone."""
    clock = time.perf_counter
    while not _stopping:
        try:
            message = wire.recv()
        except EOFError:  # the parent is gone
            break
        except Undecodable as exc:
            wire.send(Unreadable(f"{type(exc.error).__name__}: {exc.error}"))
            continue
        if message is None:
            break
        seqs, items, *tried = cast("tuple[Sequence[Key], Sequence[object], int]", message)
        before = tried[0] if tried else 0  # tries an item sent again alone had before
        paced = progress is not None or before or rated
        ctx.pacer = _Pacer(wire, progress, before, rated) if paced else None
        started = clock()
        if progress is None:
            if kernel.needs_setup(ctx):
                _set_up(kernel, ctx)
            outcome = kernel.process_columns(seqs, items, ctx)
        else:
            outcome = _tracked(wire, kernel, seqs, items, ctx, progress)
        try:
            _reply(wire, kernel.name, seqs, outcome, clock() - started)
        except OSError:  # the parent is gone (BrokenPipeError): nobody to reply to
            break
    # Told to stop, or the parent is gone: from here on a SIGTERM waits (for good).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


class _Pacer:
    """Between the tries of a retried call in this worker: under a rate limit,
    the next try waits for its slot (the parent holds the stage's limiter);
    under a timeout, no deadline runs during the backoff and that wait, and the
    parent is told when the next try begins (its deadline counts from then)."""

    __slots__ = ("_progress", "_rated", "_wire", "attempts_before")

    def __init__(self, wire: Wire, progress: Progress | None, before: int, rated: bool) -> None:
        self._wire, self._progress, self._rated = wire, progress, rated
        self.attempts_before = before

    def resting(self) -> None:
        if self._progress is not None:
            self._progress.slots[1] = math.inf  # as during a setup

    def rest(self, seconds: float) -> None:
        time.sleep(seconds)  # a run that stops sends SIGTERM, which ends the sleep

    async def arest(self, seconds: float) -> None:
        import asyncio

        await asyncio.sleep(seconds)

    def trying(self) -> None:
        if self._rated:
            time.sleep(self._slot())
        self._begin()

    async def atrying(self) -> None:
        if self._rated:
            import asyncio

            await asyncio.sleep(self._slot())
        self._begin()

    def _slot(self) -> float:
        """Seconds until this try's slot of the stage's rate (asked of the parent,
        which is waiting for this batch's reply and answers at once)."""
        self._wire.send(SLOT)
        return cast("float", self._wire.recv())

    def _begin(self) -> None:
        if self._progress is not None:
            slots = self._progress.slots
            slots[2] += 1  # read by the parent if this try passes its deadline
            slots[1] = time.monotonic()
            self._wire.send(SET_UP)  # the parent waits for no deadline meanwhile: wake it


def _tracked(
    wire: Wire,
    kernel: Kernel,
    keys: Sequence[Key],
    items: Sequence[object],
    ctx: WorkerContext,
    progress: Progress,
) -> Outcome:
    """Run a batch one call at a time, writing down before each which one it is."""
    slots = progress.slots
    clock = time.monotonic
    if kernel.needs_setup(ctx):
        # A stateful stage's setup is not a call: no deadline runs while it does
        # (an endless start), and the parent, told when it is over, counts the
        # first call's deadline from then.
        slots[1] = math.inf
        _set_up(kernel, ctx)
        slots[1] = clock()
        wire.send(SET_UP)
    begun = slots[0]
    gather = Gather(keys)
    for key, item in zip(keys, items, strict=True):
        slots[2] = 0.0
        slots[1] = clock()  # the start first, then the count (see _progress)
        begun += 1
        slots[0] = begun
        gather.add(kernel.process_columns((key,), (item,), ctx))
    return gather.outcome()


def _set_up(kernel: Kernel, ctx: WorkerContext) -> None:
    """Run a stateful stage's ``setup`` with SIGTERM held back until it is over.

    A cancellation that lands in a setup would leave what it opened without a
    teardown (the state is recorded only once ``setup`` returns); held back, it
    lands right after, and the teardown runs.  A setup that never ends is
    killed a second after the SIGTERM, like a stuck call.
    """
    held = {signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        kernel.prepare(ctx)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


#: Set by SIGTERM.  The WorkerExit raised with it can land in a finalizer, which
#: swallows it; the loop then stops at its next turn instead.
_stopping = False


def _quiet_worker_exit(unraisable: sys.UnraisableHookArgs) -> None:
    if not isinstance(unraisable.exc_value, WorkerExit):
        sys.__unraisablehook__(unraisable)


def _terminate(signum: int, frame: object) -> None:
    global _stopping
    _stopping = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: let the teardown finish
    raise WorkerExit(128 + signum)


def _reply(wire: Wire, stage: str, batch: Sequence[Key], outcome: Outcome, seconds: float) -> None:
    keys = outcome.keys
    if (
        outcome.values
        and type(keys) is not range  # sent as a range already: it goes back as it is
        and type(first := keys[0]) is int
        and type(last := keys[-1]) is int
    ):
        # Consecutive positions (the common case) travel as a range: a smaller
        # pickle, and nothing left for the parent's collector to check.
        consecutive = range(first, last + 1)
        if len(consecutive) == len(keys) and tuple(consecutive) == keys:
            outcome.keys = consecutive
    # Failures travel apart: their exceptions may not pickle, and their tracebacks
    # must be turned into text first.
    release_callers([err for _, err in outcome.failed])  # nor in this process
    raw = [_raw_failure(seq, err.exception, err.attempts) for seq, err in outcome.failed]
    outcome.failed = []
    outcome.values = lift(outcome.values)  # large bytes leave out of band
    try:
        wire.send((outcome, raw, seconds))
        return
    except OSError:
        raise
    except Exception:  # noqa: BLE001 - some result does not pickle: find which
        pass
    # The input item whose call made a value that does not pickle fails, and none
    # of that call's outputs goes on (a one-to-many call's siblings included).
    inputs = set(batch)
    outputs = outcome.envelopes()
    made = Counter(_source(seq, inputs) for seq, _ in outputs)
    problems: dict[Key, TypeError] = {}
    for seq, value in outputs:
        source = _source(seq, inputs)
        if source in problems:
            continue
        try:
            pickle.dumps(value, protocol=5)
        except Exception as exc:  # noqa: BLE001 - reported as this item's failure
            problems[source] = TypeError(
                f"stage {stage!r} returned a value that cannot be sent back from its worker "
                f"process ({type(exc).__name__}: {exc}); return plain data, or use "
                "backend='thread'"
            )
    for source, problem in problems.items():
        raw.append((source, problem, "", 1))
        if made[source] != 1:  # its outputs no longer count: the failure is its one
            outcome.deltas.remove((root_of(source), made[source] - 1))
    outcome.ok = [(seq, value) for seq, value in outputs if _source(seq, inputs) not in problems]
    outcome.keys, outcome.values, outcome.span = (), [], None
    outcome.whole = [root for root in outcome.whole if root not in problems]
    wire.send((outcome, raw, seconds))


def _source(key: Key, inputs: set[Key]) -> Key:
    """The key of the batch's item that made the output keyed ``key``: the same key,
    or for an output of a one-to-many call, its parent's (see ``child_key``)."""
    if key in inputs:
        return key
    assert isinstance(key, tuple)
    return key[0] if len(key) == 2 else key[:-1]


def _raw_failure(seq: Key, exc: BaseException, attempts: int) -> RawFailure:
    import traceback  # on the first failure only: with textwrap, 2-3 ms of every start-up

    text = "".join(traceback.format_exception(exc))
    if isinstance(exc, SetupFailed):  # it must stay one: it stops the run
        exc = SetupFailed(exc.stage, _sendable(exc.error))
    else:
        exc = _sendable(exc)
    return (seq, exc, text, attempts)


def _sendable(exc: BaseException) -> BaseException:
    """``exc``, or a stand-in naming it when it does not survive pickling."""
    try:
        pickle.loads(pickle.dumps(exc, protocol=5))
    except Exception:  # noqa: BLE001 - the exception itself does not survive pickling
        name, shown = type(exc).__qualname__, short_str(exc)
        return RuntimeError(f"{name}: {shown} (the exception could not be pickled)")
    return exc
