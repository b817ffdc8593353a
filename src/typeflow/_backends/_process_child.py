"""The main loop of a process worker.  Imported by the forkserver ahead of time."""

from __future__ import annotations

import pickle
import signal
import traceback
from multiprocessing.connection import Connection

from typeflow._backends._wire import recv, send
from typeflow._runtime._kernel import Envelope, Kernel, Key, Outcome, WorkerContext

__all__ = ["READY", "RawFailure", "Reply", "child_main"]

#: The first message of a worker process: it is up and holds the kernel.
READY = b"ready"

#: A failure as it crosses back to the parent: position, exception, formatted
#: traceback, number of tries.
RawFailure = tuple[Key, BaseException, str, int]
#: What a worker process sends back for a batch: the outcome without its
#: failures, and the failures as :data:`RawFailure`.
Reply = tuple[Outcome, list[RawFailure]]


def child_main(conn: Connection, kernel_bytes: bytes, index: int) -> None:
    # Ctrl-C reaches the whole process group; the parent decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    kernel: Kernel = pickle.loads(kernel_bytes)
    ctx = WorkerContext(index)
    conn.send_bytes(READY)  # the parent starts its clock for timeouts from here
    try:
        while True:
            try:
                batch = recv(conn)
            except EOFError:  # the parent is gone
                break
            if batch is None:
                break
            assert isinstance(batch, list)
            outcome = kernel.process(batch, ctx)  # pyright: ignore[reportUnknownArgumentType]
            _reply(conn, kernel.name, outcome)
    finally:
        ctx.close()
        conn.close()


def _reply(conn: Connection, stage: str, outcome: Outcome) -> None:
    # Failures travel apart: their exceptions may not pickle, and their tracebacks
    # must be turned into text first.
    raw = [_raw_failure(seq, err.exception, err.attempts) for seq, err in outcome.failed]
    outcome.failed = []
    try:
        send(conn, (outcome, raw))
        return
    except Exception:  # noqa: BLE001 - some result does not pickle: find which
        pass
    kept: list[Envelope] = []
    for seq, value in outcome.ok:
        try:
            pickle.dumps(value, protocol=5)
        except Exception as exc:  # noqa: BLE001 - reported as this item's failure
            problem = TypeError(
                f"stage {stage!r} returned a value that cannot be sent back from its worker "
                f"process ({type(exc).__name__}: {exc}); return plain data, or use "
                "backend='thread'"
            )
            raw.append((seq, problem, "", 1))
        else:
            kept.append((seq, value))
    outcome.ok = kept
    send(conn, (outcome, raw))


def _raw_failure(seq: Key, exc: BaseException, attempts: int) -> RawFailure:
    text = "".join(traceback.format_exception(exc))
    try:
        pickle.loads(pickle.dumps(exc, protocol=5))
    except Exception:  # noqa: BLE001 - the exception itself does not survive pickling
        exc = RuntimeError(f"{type(exc).__qualname__}: {exc} (the exception could not be pickled)")
    return (seq, exc, text, attempts)
