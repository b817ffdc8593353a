"""``backend="process"``: one process per worker, each driven by one pump thread.

Each worker process has its own duplex pipe; a pump thread in the parent takes
a batch from the stage's inbox, sends it, and waits for the reply *or* the
process's death on the same ``wait`` call -- no polling, no shared queue lock,
no feeder thread.  Batches travel as pickle protocol 5 with out-of-band buffers
(:mod:`typeflow._backends._wire`).

A worker that dies (SIGKILL, ``os._exit``, segfault, out-of-memory killer) is
replaced.  If it held a single item, that item becomes a ``Failure`` carrying
:class:`~typeflow.WorkerCrashed`; if it held a batch, each item of the batch is
run again on its own in a fresh worker, so only the item that kills a worker
fails (the others may thus run twice).

Start method: ``forkserver`` where the platform has it (forking a process that
runs threads is unsafe, and typeflow's parent always does), else ``spawn``.
Set ``TYPEFLOW_START_METHOD`` to override.  The forkserver preloads typeflow,
so after the first run a worker starts in a few milliseconds.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkContext, ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from typing import Final, TypeAlias, cast

from typeflow._backends._base import Emitter, RunEnv, fail_batch
from typeflow._backends._process_child import READY, RawFailure, Reply, child_main
from typeflow._backends._wire import recv, send
from typeflow._errors import (
    DefinitionError,
    RemoteTraceback,
    StageError,
    StageTimeout,
    WorkerCrashed,
    WorkerStartError,
)
from typeflow._runtime import _retry as retry
from typeflow._runtime._channel import Channel, ChannelAborted, EndOfChannel
from typeflow._runtime._kernel import Envelope, Failed, Node, Outcome

__all__ = ["BATCH_LIMIT", "ProcessGroup", "mp_context", "start"]

#: The most items sent to a worker process in one message.
BATCH_LIMIT: Final = 1024

_Context: TypeAlias = ForkServerContext | SpawnContext | ForkContext
_context: _Context | None = None
_context_lock = threading.Lock()


def mp_context() -> _Context:
    """The multiprocessing context for worker processes (chosen once per process)."""
    global _context
    with _context_lock:
        if _context is None:
            method = os.environ.get("TYPEFLOW_START_METHOD") or (
                "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
            )
            if method == "forkserver":
                server = multiprocessing.get_context("forkserver")
                server.set_forkserver_preload(["typeflow._backends._process_child", "cloudpickle"])
                _context = server
            elif method == "spawn":
                _context = multiprocessing.get_context("spawn")
            elif method == "fork":
                _context = multiprocessing.get_context("fork")
            else:
                raise DefinitionError(
                    f"TYPEFLOW_START_METHOD={method!r} is not a start method; use "
                    "'forkserver', 'spawn' or 'fork'"
                )
        return _context


class _Cancelled(Exception):
    pass


#: How many times a worker process that dies while starting is started again.
_START_ATTEMPTS: Final = 3


class _Unpicklable(Exception):
    pass


class _Pump:
    """Drives one worker process: the thread that feeds it and replaces it when it dies."""

    def __init__(
        self,
        node: Node,
        kernel_bytes: bytes,
        inbox: Channel[Envelope],
        emitter: Emitter,
        index: int,
    ) -> None:
        self._node = node
        self._options = node.options
        # A plain function's timeout is enforced here, by killing the worker;
        # an async function's by the kernel, which cancels the call.
        self._timeout = node.options.timeout if not node.kernel.is_async else None
        self._kernel_bytes = kernel_bytes
        self._inbox = inbox
        self._emitter = emitter
        self._index = index
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self.thread = threading.Thread(
            target=self._main, name=f"typeflow:{node.name}:{index}", daemon=True
        )

    # -- worker process ------------------------------------------------------

    def _spawn(self) -> None:
        """Start a worker process and wait until it is ready.

        A worker that dies while starting is started again (it may have been
        killed from outside); after three failed starts the error is raised.
        """
        for _ in range(_START_ATTEMPTS - 1):
            with contextlib.suppress(WorkerStartError):
                return self._spawn_once()
        return self._spawn_once()

    def _spawn_once(self) -> None:
        ctx = mp_context()
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=child_main,
            args=(child, self._kernel_bytes, self._index),
            name=f"typeflow:{self._node.name}:{self._index}",
            daemon=True,
        )
        with self._lock:
            if self._cancelled.is_set():
                parent.close()
                child.close()
                raise _Cancelled
            proc.start()
            self._proc, self._conn = proc, parent
        child.close()
        # Wait until the worker is up, so that start-up never counts against a timeout.
        try:
            if parent in wait([parent, proc.sentinel]) and parent.recv_bytes() == READY:
                return
        except (OSError, EOFError):
            pass
        if self._cancelled.is_set():
            raise _Cancelled
        exitcode = self._stop_worker(kill=True)
        raise WorkerStartError(self._node.name, exitcode, _START_ATTEMPTS)

    def _stop_worker(self, *, kill: bool) -> int | None:
        """Stop the worker process (politely unless ``kill``); returns its exit code."""
        with self._lock:
            proc, conn = self._proc, self._conn
            self._proc = self._conn = None
        if proc is None or conn is None:
            return None
        if not kill:
            with contextlib.suppress(OSError):
                send(conn, None)
            proc.join(1.0)
        if proc.is_alive():
            proc.kill()
        proc.join(1.0)
        conn.close()
        return proc.exitcode

    def cancel(self) -> None:
        with self._lock:
            self._cancelled.set()
            proc = self._proc
        if proc is not None and proc.pid is not None and proc.exitcode is None:
            with contextlib.suppress(OSError):
                proc.kill()

    # -- the pump ------------------------------------------------------------

    def _main(self) -> None:
        try:
            limit = 1 if self._timeout is not None else BATCH_LIMIT
            share = self._options.workers
            while True:
                batch = self._inbox.get_many(limit, share)
                try:
                    outcome = self._roundtrip(batch)
                except (_Cancelled, ChannelAborted):
                    raise
                except Exception as exc:  # noqa: BLE001 - e.g. a worker that cannot start
                    outcome = fail_batch(self._node, batch, exc)
                self._emitter.emit(outcome)
        except (EndOfChannel, ChannelAborted, _Cancelled):
            pass
        finally:
            self._stop_worker(kill=self._cancelled.is_set())
            self._emitter.done()

    def _roundtrip(self, batch: list[Envelope]) -> Outcome:
        unsendable: list[Failed] = []
        try:
            reply = self._exchange(batch)
        except _Unpicklable:
            batch, unsendable = self._split_unpicklable(batch)
            if not batch:
                return Outcome(failed=unsendable)
            reply = self._exchange(batch)
        if isinstance(reply, BaseException):
            outcome = self._retry_alone(batch, reply)
        else:
            outcome, raw = reply
            outcome.failed = self._failures(batch, raw)
        outcome.failed += unsendable
        return outcome

    def _exchange(self, batch: list[Envelope]) -> Reply | BaseException:
        """Send a batch and wait for the reply, the worker's death or the deadline.

        Returns the reply, or the error that ended the worker (which is then gone).
        """
        if self._proc is None:
            self._spawn()
        proc, conn = self._proc, self._conn
        if proc is None or conn is None:
            raise _Cancelled
        timed_out = False
        try:
            try:
                send(conn, batch)
            except OSError:
                raise
            except Exception as exc:
                raise _Unpicklable from exc
            ready = wait([conn, proc.sentinel], self._timeout)
            if conn in ready:
                return cast(Reply, recv(conn))
            timed_out = not ready
        except (OSError, EOFError):
            pass
        if self._cancelled.is_set():
            raise _Cancelled
        exitcode = self._stop_worker(kill=True)
        self._emitter.restarted()
        name = self._node.name
        if timed_out:
            assert self._timeout is not None
            return StageTimeout(name, self._timeout)
        return WorkerCrashed(name, exitcode)

    def _retry_alone(self, batch: list[Envelope], error: BaseException) -> Outcome:
        """The worker died (or timed out) holding ``batch``: run each item on its own."""
        if len(batch) > 1:  # find the item that kills workers; the others may run twice
            outcome = Outcome()
            for envelope in batch:
                more = self._roundtrip([envelope])
                outcome.ok += more.ok
                outcome.failed += more.failed
                outcome.retries += more.retries
            return outcome
        (seq, item), attempt = batch[0], 1
        while self._options.should_retry(error, attempt):
            if self._cancelled.wait(retry.delay(self._options, attempt)):
                raise _Cancelled
            attempt += 1
            reply = self._exchange(batch)
            if not isinstance(reply, BaseException):
                outcome, raw = reply
                outcome.failed = self._failures(batch, raw)
                for _, err in outcome.failed:
                    err.attempts += attempt - 1
                outcome.retries += attempt - 1
                return outcome
            error = reply
        failure = StageError(self._node.name, item, error, attempts=attempt)
        return Outcome(failed=[(seq, failure)], retries=attempt - 1)

    def _failures(self, batch: list[Envelope], raw: list[RawFailure]) -> list[Failed]:
        if not raw:
            return []
        items = dict(batch)
        failed: list[Failed] = []
        for seq, exc, text, attempts in raw:
            if text:
                exc.__cause__ = RemoteTraceback(text)
            failed.append(
                (seq, StageError(self._node.name, items.get(seq), exc, attempts=attempts))
            )
        return failed

    def _split_unpicklable(self, batch: list[Envelope]) -> tuple[list[Envelope], list[Failed]]:
        good: list[Envelope] = []
        bad: list[Failed] = []
        for seq, item in batch:
            try:
                pickle.dumps(item, protocol=5)
            except Exception as exc:  # noqa: BLE001 - reported as this item's failure
                problem = TypeError(
                    f"the item cannot be sent to a worker process of stage {self._node.name!r} "
                    f"({type(exc).__name__}: {exc}); pass plain data, or use backend='thread'"
                )
                bad.append((seq, StageError(self._node.name, item, problem)))
            else:
                good.append((seq, item))
        return good, bad


class ProcessGroup:
    """The pumps and worker processes of one stage."""

    def __init__(self, pumps: list[_Pump]) -> None:
        self.pumps = pumps

    def cancel(self) -> None:
        for pump in self.pumps:
            pump.cancel()

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for pump in self.pumps:
            pump.thread.join(max(0.0, deadline - time.monotonic()))
        return not any(p.thread.is_alive() for p in self.pumps)


def start(
    node: Node, inbox: Channel[Envelope], emitters: Sequence[Emitter], env: RunEnv
) -> ProcessGroup:
    import cloudpickle

    mp_context()  # a bad TYPEFLOW_START_METHOD fails the run before it starts
    try:
        kernel_bytes = cloudpickle.dumps(node.kernel, protocol=5)
    except Exception as exc:
        raise DefinitionError(
            f"stage {node.name!r} cannot be sent to its worker processes "
            f"({type(exc).__name__}: {exc}); use backend='thread', or make the function "
            "and what it captures picklable"
        ) from exc
    pumps = [_Pump(node, kernel_bytes, inbox, e, i) for i, e in enumerate(emitters)]
    for pump in pumps:
        pump.thread.start()
    return ProcessGroup(pumps)
