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

import multiprocessing
import os
import pickle
import threading
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkContext, ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from typing import Final, TypeAlias, cast

from typeflow._backends._base import Emitter, RunEnv, fail_batch
from typeflow._backends._process_child import RawFailure, child_main
from typeflow._backends._wire import recv, send
from typeflow._errors import DefinitionError, RemoteTraceback, StageError, WorkerCrashed
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
                server.set_forkserver_preload(["typeflow._backends._process_child"])
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


#: What a worker process sends back for a batch.
_Reply: TypeAlias = tuple[list[Envelope], list[RawFailure]]


class _Cancelled(Exception):
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
        self._kernel_bytes = kernel_bytes
        self._inbox = inbox
        self._emitter = emitter
        self._index = index
        self._cancelled = False
        self._lock = threading.Lock()
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self.restarts = 0
        self.thread = threading.Thread(
            target=self._main, name=f"typeflow:{node.name}:{index}", daemon=True
        )

    # -- worker process ------------------------------------------------------

    def _spawn(self) -> None:
        ctx = mp_context()
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=child_main,
            args=(child, self._kernel_bytes, self._index),
            name=f"typeflow:{self._node.name}:{self._index}",
            daemon=True,
        )
        with self._lock:
            if self._cancelled:
                parent.close()
                child.close()
                raise _Cancelled
            proc.start()
            self._proc, self._conn = proc, parent
        child.close()

    def _stop_worker(self, *, kill: bool) -> None:
        with self._lock:
            proc, conn = self._proc, self._conn
            self._proc = self._conn = None
        if proc is None or conn is None:
            return
        if not kill:
            try:
                send(conn, None)
            except OSError:
                pass
            proc.join(1.0)
        if proc.is_alive():
            proc.kill()
        proc.join(1.0)
        conn.close()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            proc = self._proc
        if proc is not None and proc.pid is not None and proc.exitcode is None:
            try:
                proc.kill()
            except OSError:
                pass

    # -- the pump ------------------------------------------------------------

    def _main(self) -> None:
        try:
            limit = BATCH_LIMIT
            share = self._node.options.workers
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
            self._stop_worker(kill=self._cancelled)
            self._emitter.done()

    def _roundtrip(self, batch: list[Envelope]) -> Outcome:
        unsendable: list[Failed] = []
        reply: _Reply | None
        try:
            reply = self._exchange(batch)
        except _Unpicklable:
            batch, unsendable = self._split_unpicklable(batch)
            reply = self._exchange(batch) if batch else ([], [])
        if reply is None:
            return self._after_crash(batch, unsendable)
        ok, raw = reply
        return ok, self._failures(batch, raw) + unsendable

    def _exchange(self, batch: list[Envelope]) -> _Reply | None:
        """Send a batch and wait for the reply; None if the worker died meanwhile."""
        if self._proc is None:
            self._spawn()
        proc, conn = self._proc, self._conn
        if proc is None or conn is None:
            raise _Cancelled
        try:
            try:
                send(conn, batch)
            except OSError:
                raise
            except Exception as exc:  # noqa: BLE001 - pickling failed before anything was sent
                raise _Unpicklable from exc
            ready = wait([conn, proc.sentinel])
            if conn in ready:
                return cast(_Reply, recv(conn))
        except (OSError, EOFError):
            pass
        if self._cancelled:
            raise _Cancelled
        return None

    def _after_crash(self, batch: list[Envelope], unsendable: list[Failed]) -> Outcome:
        proc = self._proc
        exitcode: int | None = None
        if proc is not None:
            proc.join(1.0)  # it is dead or dying: collect its exit status
            exitcode = proc.exitcode
        self._stop_worker(kill=True)
        self.restarts += 1
        name = self._node.name
        if len(batch) == 1:
            seq, item = batch[0]
            crash = StageError(name, item, WorkerCrashed(name, exitcode))
            return [], [(seq, crash), *unsendable]
        # Several items were in the dead worker: find the one that kills it.
        ok: list[Envelope] = []
        failed: list[Failed] = list(unsendable)
        for envelope in batch:
            more_ok, more_failed = self._roundtrip([envelope])
            ok += more_ok
            failed += more_failed
        return ok, failed

    def _failures(self, batch: list[Envelope], raw: list[RawFailure]) -> list[Failed]:
        if not raw:
            return []
        items = dict(batch)
        failed: list[Failed] = []
        for seq, exc, text in raw:
            if text:
                exc.__cause__ = RemoteTraceback(text)
            failed.append((seq, StageError(self._node.name, items.get(seq), exc)))
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


class _Unpicklable(Exception):
    pass


class ProcessGroup:
    """The pumps and worker processes of one stage."""

    def __init__(self, pumps: list[_Pump]) -> None:
        self.pumps = pumps

    @property
    def restarts(self) -> int:
        return sum(p.restarts for p in self.pumps)

    def cancel(self) -> None:
        for pump in self.pumps:
            pump.cancel()

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for pump in self.pumps:
            pump.thread.join(max(0.0, deadline - time.monotonic()))
        return not any(p.thread.is_alive() for p in self.pumps)


def start(node: Node, inbox: Channel[Envelope], emitter: Emitter, env: RunEnv) -> ProcessGroup:
    import cloudpickle

    try:
        kernel_bytes = cloudpickle.dumps(node.kernel, protocol=5)
    except Exception as exc:  # noqa: BLE001 - anything pickling raises means "cannot ship"
        raise DefinitionError(
            f"stage {node.name!r} cannot be sent to its worker processes "
            f"({type(exc).__name__}: {exc}); use backend='thread', or make the function "
            "and what it captures picklable"
        ) from exc
    pumps = [_Pump(node, kernel_bytes, inbox, emitter, i) for i in range(node.options.workers)]
    for pump in pumps:
        pump.thread.start()
    return ProcessGroup(pumps)
