"""``backend="process"``: one process per worker, each driven by one pump thread.

Each worker process has its own duplex socket; a pump thread in the parent
takes batches from the stage's inbox, sends them, and waits for the replies
*or* the process's death on the same ``poll`` call -- no polling loop, no
shared queue lock, no feeder thread.  (A send may also wait, until the worker
has read enough of the batch: a live worker always reads, and a dead one
fails the send.)  Batches travel as pickle protocol 5 with large
buffers out of band, read straight into place (:mod:`typeflow._backends._wire`).

* **Adaptive batches.**  A batch is about :data:`BATCH_SECONDS` of the worker's
  own time (it reports how long the kernel took) and about
  :data:`BATCH_BYTES` on the wire, at most :data:`BATCH_LIMIT` items, one item
  at first (see :class:`~typeflow._backends._base.BatchSizer`).  Slow items
  travel one by one, so results come out as soon as they are made and a
  cancelled run does not wait for a long batch (the worker is killed anyway).
* **Two batches in flight.**  While the worker computes one batch, the next
  one already waits in its socket, so the round trip (about 0.2 ms on a busy
  VM) is hidden.  The pump takes that second batch only for quick items (less
  than :data:`BATCH_SECONDS` each: a slow item should go to an idle worker,
  not wait behind another one), only if it is already in the inbox and big
  (:data:`_SECOND_BATCH_MIN` items, or a full batch: a small one costs the
  parent as much, and collecting the reply first lets the inbox fill up), not
  at the end of the input (what is left is shared out so that the workers
  finish together).  Sending it may wait until the worker reads it (a large
  batch streams in as the worker takes it, see :mod:`~typeflow._backends._wire`);
  a worker that is meanwhile blocked sending a big reply, which the pump reads
  only after its own send returns, reads the batch while it waits, so the two
  never wait for each other (a second batch goes early only up to
  :data:`_SECOND_BATCH_BYTES`: a worker that reads it that way holds it in
  memory of its own).  Under a ``timeout`` the pump must not wait for a busy
  worker in a send (a worker stuck in a call reads nothing, and its deadline
  is watched only while the pump waits for the reply): a second batch goes
  early only if it fits into the socket's buffer (:attr:`Wire.pipeline_bytes`),
  and its send waits at most for the worker to take the rest of the batch
  before it.  Batches still hold many items under a timeout, and
  each call has its own deadline: the worker notes in shared memory which item it
  is on and when it began it (:mod:`~typeflow._backends._progress`), which the
  pump reads when a deadline passes; before the worker begins a batch, the
  deadline counts from the reply to the one before it.  Under a rate limit the
  pump sends one item at a time, each once its slot has come.
* **Told to stop early.**  When the pump sends a batch and the inbox is then
  closed and empty, the request to stop follows it at once: the worker exits
  (running a stateful stage's teardown) as soon as it has replied, while its
  last results make their way to the caller, instead of after them.  The
  request travels in the batch's own send.

A worker that dies (SIGKILL, ``os._exit``, segfault, out-of-memory killer) is
replaced.  If it held a single item, that item becomes a ``Failure`` carrying
:class:`~typeflow.WorkerCrashed`; if it held a batch, each item of the batch is
run again on its own in a fresh worker, so only the item that kills a worker
fails (the others may thus run twice).  A call past its deadline is known by
its place in the batch: it fails (or is retried), the items before it run
again (their results went with the worker), the ones after it are sent again.
A batch queued behind the one that killed the worker had not started: it is
simply sent again.

Start method.  Replacements (and workers started while other threads run) use
``forkserver`` where the platform has it, else ``spawn``: forking a process
that runs threads is unsafe.  The forkserver preloads typeflow, so after its
own start (a fresh interpreter, about 0.1 s) a worker starts in a few
milliseconds.  The *first* workers of a run are forked directly from the
caller when that is safe: on Linux, when the calling thread is the only Python
thread alive (``threading.active_count() == 1``, which is what the scheduler
arranges by starting process stages first, see :func:`deferred_threads`).  That
is what ``multiprocessing.Pool`` does by default on Linux, and it makes a
short run start in milliseconds.  A forked worker closes the parent's ends of
the worker sockets it inherited (so that each worker sees end-of-file when the
parent dies), resets SIGTERM and ignores SIGINT; it has nothing to load, so it
sends no READY and gets its first batch at once (a worker started any other way
says READY once it has unpickled its kernel, and a timeout counts from there).  Threads started by C
libraries are invisible to that check, as they are to ``Pool``.  Set
``TYPEFLOW_START_METHOD`` (``forkserver``, ``spawn`` or ``fork``) to use one
method for every worker, the first ones included.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from multiprocessing.context import ForkContext, ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from typing import Any, Final, TypeAlias, cast

from typeflow._backends._base import (
    BatchSizer,
    Emitter,
    RateLimiter,
    RunEnv,
    fail_batch,
    rate_limiter,
)
from typeflow._backends._process_child import (
    READY,
    SET_UP,
    SLOT,
    RawFailure,
    Reply,
    Unreadable,
    child_main,
)
from typeflow._backends._progress import Progress
from typeflow._backends._wire import Endpoint, Undecodable, Wire, encode, lift
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
from typeflow._runtime._kernel import (
    Envelope,
    Failed,
    Key,
    Node,
    Outcome,
    SetupFailed,
    StatefulKernel,
    main_script,
    rows,
    ship,
)
from typeflow._worker import WorkerInfo

__all__ = [
    "BATCH_BYTES",
    "BATCH_LIMIT",
    "BATCH_SECONDS",
    "INBOX_BYTES",
    "ProcessGroup",
    "deferred_threads",
    "mp_context",
    "start",
]

#: The most items sent to a worker process in one message.
BATCH_LIMIT: Final = 1024
#: About how long the work of one batch should take in the worker, in seconds.
#: Each batch costs the parent some 0.1-0.3 ms of CPU (its threads, the system
#: calls), taken from the workers on a small machine: with 1 ms items, 10 ms
#: batches reach 1.8x serial on 2 cores where 2 ms batches stay at 1.7x.  The end
#: of a run stays balanced: a worker takes only a fair share of what is left.
BATCH_SECONDS: Final = 0.010
#: About how many bytes one batch should weigh on the wire (at least one item).
BATCH_BYTES: Final = 1024 * 1024
#: A byte budget for the inbox of a process stage (``Channel(max_bytes=...)``):
#: large items (arrays, images) wait in front of the stage by size, not only by
#: count (items under this over the buffer's length, by count alone).
INBOX_BYTES: Final = 8 * 1024 * 1024
#: How many batches a worker process holds at once: one it works on, one waiting.
_IN_FLIGHT: Final = 2
#: How long a cancelled worker has to end on SIGTERM before it is killed.
_TERM_GRACE: Final = 1.0
#: Quick items (a full batch of them under 5 ms of work) are not shared out: a
#: pump takes all that wait, up to its limit, since every batch costs the parent
#: as much whatever its size (one pump with big batches keeps up with more
#: workers than many pumps with small ones).  Slow items are shared out fairly.
_LEAST: Final = BATCH_LIMIT
_LEAST_SECONDS: Final = 0.005
#: A second batch is sent ahead only if it would hold this many items (or a full
#: batch): a smaller one costs the parent as much as a big one, and collecting the
#: reply first lets the inbox fill up for a bigger batch.
_SECOND_BATCH_MIN: Final = 64
#: The largest batch sent while the worker is busy with the one before (and, under
#: a timeout, only what fits into the socket's buffer): a worker that meanwhile
#: sends a large reply reads the batch into memory of its own, copied again after.
_SECOND_BATCH_BYTES: Final = 2 * BATCH_BYTES

_Context: TypeAlias = ForkServerContext | SpawnContext | ForkContext
_context: _Context | None = None
_context_lock = threading.Lock()


def _installed_packages() -> list[str]:
    """The installed (site-packages) top-level packages this program has imported.

    The forkserver imports them once, so that a worker, which re-imports the
    main module, finds NumPy & co. already loaded instead of spending 0.2 s or
    more importing them again.  Only installed packages: a module next to the
    script may do anything when imported, and is imported by each worker as
    usual.  (Preloading ``"__main__"`` itself does not work before Python 3.13.)
    """
    import sysconfig

    paths = sysconfig.get_paths()
    roots = tuple({os.path.join(paths[key], "") for key in ("purelib", "platlib")})
    names: list[str] = []
    for name, module in list(sys.modules.items()):
        if "." in name or name.startswith("_") or name == "typeflow":
            continue
        origin = getattr(module, "__file__", None)
        if isinstance(origin, str) and origin.startswith(roots):
            names.append(name)
    return sorted(names)


_START_METHODS: Final = ("forkserver", "spawn", "fork")


def start_method() -> str:
    """The start method for worker processes that are not forked directly."""
    method = os.environ.get("TYPEFLOW_START_METHOD") or (
        "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    )
    if method not in _START_METHODS:
        raise DefinitionError(
            f"TYPEFLOW_START_METHOD={method!r} is not a start method; use "
            "'forkserver', 'spawn' or 'fork'"
        )
    return method


def mp_context() -> _Context:
    """The multiprocessing context for worker processes (chosen once per process,
    when the first worker that is not forked directly starts)."""
    global _context
    with _context_lock:
        if _context is None:
            method = start_method()
            if method == "forkserver":
                server = multiprocessing.get_context("forkserver")
                server.set_forkserver_preload(
                    ["typeflow._backends._process_child", "cloudpickle", *_installed_packages()]
                )
                _context = server
            elif method == "spawn":
                _context = multiprocessing.get_context("spawn")
            else:
                _context = multiprocessing.get_context("fork")
        return _context


class _Cancelled(Exception):
    pass


#: How many times a worker process that dies while starting is started again.
_START_ATTEMPTS: Final = 3
#: How long a worker told to stop may take to end (a stateful stage's teardown)
#: before it is killed; a cancelled run does not wait for it.
STOP_GRACE: Final = 30.0

logger = logging.getLogger("typeflow")


class _Unpicklable(Exception):
    pass


class _Garbled(Exception):
    """A reply arrived whole but is of no use: the worker could not unpickle the
    batch, or this process cannot unpickle the reply.  The worker is fine and in
    step with its socket.  Raised by the waits for a reply."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


class _Gone(Exception):
    """The worker process is gone: ``error`` says why (a ``StageTimeout`` or a
    ``WorkerCrashed``), ``at`` which item of the batch it was on, when known.
    Returned by the waits for a reply, never raised."""

    def __init__(self, error: BaseException, at: int | None = None, tried: int = 0) -> None:
        super().__init__(error, at)
        self.error = error
        self.at = at
        #: Tries of item ``at`` before the one that passed its deadline.
        self.tried = tried


class _Sent:
    """A batch on its way to (or inside) the worker process, as it was taken."""

    __slots__ = ("first", "items", "keys", "nbytes", "started")

    def __init__(
        self,
        keys: Sequence[Key],
        items: Sequence[object],
        nbytes: int,
        started: float,
        first: int = 0,
    ) -> None:
        self.keys = keys
        self.items = items
        self.nbytes = nbytes
        #: How many items the worker process had been sent before this batch: its
        #: first item is the worker's item number ``first + 1`` (see Progress).
        self.first = first
        #: When the worker began on it (``time.monotonic()``): when it was sent to an
        #: idle worker, or when the reply to the batch before it came back.  A
        #: timeout's deadline counts from here.
        self.started = started

    @property
    def batch(self) -> list[Envelope]:
        """As envelopes (for the rare paths: a failure, a crash)."""
        return rows(self.keys, self.items)


class _Pump:
    """Drives one worker process: the thread that feeds it and replaces it when it dies."""

    def __init__(
        self,
        node: Node,
        kernel_bytes: bytes,
        inbox: Channel[Envelope],
        emitter: Emitter,
        index: int,
        limiter: RateLimiter | None = None,
    ) -> None:
        self._node = node
        self._options = node.options
        # A plain function's timeout is enforced here, by killing the worker;
        # an async function's by the kernel, which cancels the call.
        self._timeout = node.options.timeout if not node.kernel.is_async else None
        self._limiter = limiter
        self._kernel_bytes = kernel_bytes
        self._inbox = inbox
        self._emitter = emitter
        self._index = index
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._proc: BaseProcess | None = None
        self._conn: Endpoint | None = None
        self._wire: Wire | None = None
        self._poller: select.poll | None = None
        self._forked: tuple[BaseProcess, Endpoint] | None = None
        #: The wire its worker was told to stop on, after its last batch.
        self._farewell: Wire | None = None
        # Under a timeout the worker writes down which item it is on, so that each
        # call in a batch has its own deadline.
        self._progress = Progress() if self._timeout is not None else None
        #: Items sent to the current worker process (its progress counts the same way).
        self._handed = 0
        self._sizer = BatchSizer(BATCH_LIMIT, BATCH_SECONDS, BATCH_BYTES)
        self._info = WorkerInfo(node.name, index, node.options.workers, "process")
        self.thread = threading.Thread(
            target=self._main, name=f"typeflow:{node.name}:{index}", daemon=True
        )

    # -- worker process ------------------------------------------------------

    def fork_now(self, inherited: list[Endpoint]) -> None:
        """Fork this pump's first worker from the calling thread (the only thread alive).

        ``inherited`` holds the parent's ends of the sockets of the workers
        forked before this one: the new worker closes them (and its own).
        """
        ctx = multiprocessing.get_context("fork")
        # A plain socket pair: a forked worker needs nothing that pickles, and
        # multiprocessing.connection costs a run 5-7 ms of imports (tempfile...).
        parent, child = socket.socketpair()
        inherited.append(parent)
        proc = ctx.Process(
            target=child_main,
            args=(
                child,
                None,
                self._index,
                list(inherited),
                self._node.kernel,
                False,
                self._progress,
                self._limiter is not None,
                self._info,
            ),
            name=f"typeflow:{self._node.name}:{self._index}",
            daemon=True,
        )
        # SIGTERM waits until the worker has its own handler: a forked worker
        # starts with the parent's (a run's drain) and would run it.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            child.close()
        reaped_once(proc)
        self._forked = (proc, parent)

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
        self._handed = 0
        if self._progress is not None:
            self._progress.reset()
        forked, self._forked = self._forked, None
        if forked is not None:
            proc, parent = forked
            with self._lock:
                if self._cancelled.is_set():
                    proc.kill()
                    proc.join()
                    parent.close()
                    raise _Cancelled
                self._proc, self._conn = proc, parent
            # A forked worker is up as soon as it exists (it imports nothing and
            # gets its kernel as is), so it sends no READY and the first batch
            # goes out at once; if it died, the first reply tells.
            self._wire = Wire(parent)
            return
        from multiprocessing.connection import wait

        ctx = mp_context()
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=child_main,
            args=(
                child,
                self._kernel_bytes,
                self._index,
                (),
                None,
                True,
                self._progress,
                self._limiter is not None,
                self._info,
            ),
            name=f"typeflow:{self._node.name}:{self._index}",
            daemon=True,
        )
        with self._lock:
            if self._cancelled.is_set():
                parent.close()
                child.close()
                raise _Cancelled
            with _main_not_imported():
                proc.start()
            reaped_once(proc)
            self._proc, self._conn = proc, parent
        child.close()
        # Wait until the worker is up, so that start-up never counts against a timeout.
        try:
            if parent in wait([parent, proc.sentinel]) and parent.recv_bytes() == READY:
                self._wire = Wire(parent)
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
            proc, conn, wire = self._proc, self._conn, self._wire
            # The process stays known while it is waited for: a run cancelled
            # meanwhile stops it (see cancel and kill_if_cancelled).
            self._conn = self._wire = None
            self._poller = None
        if proc is None or conn is None:
            with self._lock:
                self._proc = None
            return None
        if not kill and wire is not None:
            if wire is not self._farewell:
                with contextlib.suppress(OSError):
                    wire.send(None)
            # Told to stop, it runs a stateful stage's teardown, which takes what it takes.
            _join(proc, STOP_GRACE)
            if proc.is_alive():
                logger.warning(
                    "a worker process of stage %r did not end within %.0f s of being told "
                    "to stop (its teardown?); it is killed",
                    self._node.name,
                    STOP_GRACE,
                )
        elif proc.is_alive():
            # SIGTERM ends the current call and runs a stateful stage's teardown;
            # SIGKILL follows if the worker is still there a second later.
            with contextlib.suppress(OSError):
                proc.terminate()
        _join(proc, 1.0)
        if proc.is_alive():
            proc.kill()
        _join(proc, 1.0)
        with self._lock:
            if self._proc is proc:
                self._proc = None
        if wire is not None:
            wire.close()
        conn.close()
        return proc.exitcode

    def kill_if_cancelled(self) -> None:
        """SIGKILL the worker of a cancelled pump: it did not end on SIGTERM."""
        if not self._cancelled.is_set():
            return
        with self._lock:
            proc = self._proc
        if proc is not None and proc.pid is not None and proc.exitcode is None:
            with contextlib.suppress(OSError):
                proc.kill()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled.set()
            proc = self._proc
            forked = self._forked
        for p in (proc, forked[0] if forked is not None else None):
            if p is not None and p.pid is not None and p.exitcode is None:
                with contextlib.suppress(OSError):
                    p.terminate()  # the pump waits a moment for its teardown, then kills

    # -- the pump ------------------------------------------------------------

    def _main(self) -> None:
        try:
            if self._limiter is None:
                self._pipelined()
            else:
                self._one_by_one()
        except (EndOfChannel, ChannelAborted, _Cancelled):
            pass
        finally:
            self.discard()
            self._stop_worker(kill=self._cancelled.is_set())
            if self._progress is not None:
                self._progress.close()
            self._emitter.done()

    def discard(self) -> None:
        """Kill a forked worker that was never used (no input, or the run failed to start)."""
        forked, self._forked = self._forked, None
        if forked is not None:
            forked[0].kill()
            _join(forked[0], 1.0)
            forked[1].close()

    def _one_by_one(self) -> None:
        """Under a rate limit: one item at a time, each sent once its slot has come."""
        while True:
            batch = self._inbox.get_many(1, self._options.workers)
            if self._limiter is not None:
                delay = self._limiter.reserve(len(batch))
                if delay > 0 and self._cancelled.wait(delay):
                    raise _Cancelled
            self._emitter.emit(self._guarded(batch))

    def _guarded(self, batch: list[Envelope]) -> Outcome:
        try:
            return self._roundtrip(batch)
        except (_Cancelled, ChannelAborted):
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a worker that cannot start
            return fail_batch(self._node, batch, exc)

    def _pipelined(self) -> None:
        """Keep up to two batches in the worker: it computes one while the next one waits.

        Replies come back in the order the batches were sent.  The next batch
        is taken only if it is already waiting (never waiting for input while
        a reply is due); under a timeout it is sent early only if it fits into
        the socket's buffer (see the module's docstring).
        """
        sent: deque[_Sent] = deque()
        while True:
            try:
                self._pipeline(sent)
            except (EndOfChannel, ChannelAborted, _Cancelled):
                raise
            except Exception as exc:  # noqa: BLE001 - a bug in typeflow: fail, do not hang
                self._lost(sent, exc)

    def _lost(self, sent: deque[_Sent], error: Exception) -> None:
        """What the pump did not expect: the batches the worker held fail with
        ``error`` (rather than wait forever), and a new worker goes on."""
        logger.error(
            "the pump of stage %r failed; the %d item(s) its worker held fail with this "
            "error (a bug in typeflow: please report it)",
            self._node.name,
            sum(len(s.items) for s in sent),
            exc_info=error,
        )
        batches = [s.batch for s in sent]
        sent.clear()
        self._stop_worker(kill=True)
        self._emitter.restarted()
        for batch in batches:
            self._emitter.emit(fail_batch(self._node, batch, error))

    def _pipeline(self, sent: deque[_Sent]) -> None:
        """The body of :meth:`_pipelined`: runs until the input ends or the run stops."""
        inbox, share, sizer = self._inbox, self._options.workers, self._sizer
        keys: Sequence[Key]
        items: Sequence[object]
        while True:
            if len(sent) >= _IN_FLIGHT:
                self._collect(sent)
                continue
            if sent:
                # Only quick items are worth a second batch: for slow ones the round
                # trip hardly matters, and an idle worker should get the next item.
                # Nor is the end of the input: what is left is shared out one batch
                # per worker at a time, so that the workers finish together.
                quick = 0.0 < sizer.per_item < BATCH_SECONDS
                ending = inbox.closed and len(inbox) < 2 * share * sizer.limit
                worth = len(inbox) >= min(sizer.limit, _SECOND_BATCH_MIN) * share
                keys, items = (
                    inbox.take_columns_nowait(sizer.limit, share)
                    if quick and worth and not ending
                    else ((), ())
                )
                if not items:
                    self._collect(sent)
                    continue
            else:
                least = sizer.least(_LEAST, _LEAST_SECONDS)
                keys, items = inbox.get_columns(sizer.limit, share, least=least)
            try:
                parts, nbytes = encode((keys, lift(items)))
            except Exception:  # noqa: BLE001 - an item does not pickle: the careful path
                while sent:
                    self._collect(sent)
                self._emitter.emit(self._guarded(rows(keys, items)))
                continue
            while sent and nbytes > self._ahead_bytes():
                self._collect(sent)
            if self._wire is None:
                try:
                    self._spawn()
                except (_Cancelled, ChannelAborted):
                    raise
                except Exception as exc:  # noqa: BLE001 - the worker cannot start
                    self._emitter.emit(fail_batch(self._node, rows(keys, items), exc))
                    continue
            wire = self._wire
            if wire is None:
                raise _Cancelled
            if inbox.closed and not len(inbox):
                # Nothing more will come: the worker may go as soon as it has
                # replied, and its exit overlaps the last replies' way out.
                stop, stop_bytes = encode(None)
                parts += stop
                self._farewell = wire
            else:
                stop_bytes = 0
            sent.append(_Sent(keys, items, nbytes, time.monotonic(), self._handed))
            self._handed += len(items)
            with contextlib.suppress(OSError):  # the worker is gone: the next _collect sees it
                wire.send_parts(parts, nbytes + stop_bytes)

    def _ahead_bytes(self) -> int:
        """The largest batch sent while the worker is busy (see _SECOND_BATCH_BYTES)."""
        if self._timeout is None:
            return _SECOND_BATCH_BYTES
        wire = self._wire
        return wire.pipeline_bytes if wire is not None else 0

    def _collect(self, sent: deque[_Sent]) -> None:
        """Wait for the reply to the oldest batch in the worker, and pass it on."""
        try:
            reply = self._await_reply(sent[0])
        except _Garbled as garbled:
            done = sent.popleft()
            if sent:
                sent[0].started = time.monotonic()
            while sent:  # replies come in the order of the batches: the later ones first
                self._collect(sent)
            self._emitter.emit(self._garbled(done.batch, garbled))
            return
        if isinstance(reply, _Gone):
            # The worker died in the oldest batch; the later ones were not started.
            batches = [s.batch for s in sent]
            sent.clear()
            outcome = self._guarded_alone(batches[0], reply)
            self._emitter.emit(outcome)
            for batch in batches[1:]:
                self._emitter.emit(self._guarded(batch))
            return
        done = sent.popleft()
        if sent:  # the next batch starts now (under a timeout, its deadline counts from here)
            sent[0].started = time.monotonic()
        outcome, raw, seconds = reply
        outcome.failed = self._failures(done.batch, raw) if raw else []
        self._sizer.record(len(done.items), seconds, done.nbytes)
        self._emitter.emit(outcome)

    def _guarded_alone(self, batch: list[Envelope], gone: _Gone) -> Outcome:
        try:
            return self._retry_alone(batch, gone)
        except (_Cancelled, ChannelAborted):
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a worker that cannot start
            return fail_batch(self._node, batch, exc)

    def _roundtrip(self, batch: list[Envelope]) -> Outcome:
        unsendable: list[Failed] = []
        try:
            try:
                reply = self._exchange(batch)
            except _Unpicklable:
                batch, unsendable = self._split_unpicklable(batch)
                if not batch:
                    return Outcome(failed=unsendable)
                reply = self._exchange(batch)
        except _Garbled as garbled:
            outcome = self._garbled(batch, garbled)
        else:
            if isinstance(reply, _Gone):
                outcome = self._retry_alone(batch, reply)
            else:
                outcome, raw, _ = reply
                outcome.failed = self._failures(batch, raw)
        outcome.failed += unsendable
        return outcome

    def _garbled(self, batch: list[Envelope], garbled: _Garbled) -> Outcome:
        """A batch whose reply was of no use: each item runs again alone, so that only
        the items whose own reply is of no use fail (the others may run twice)."""
        if len(batch) > 1:
            outcome = Outcome()
            for envelope in batch:
                outcome.absorb(self._roundtrip([envelope]))
            return outcome
        ((seq, item),) = batch
        return Outcome(
            failed=[(seq, StageError(self._node.name, item, TypeError(garbled.problem)))]
        )

    def _exchange(self, batch: list[Envelope], tried: int = 0) -> Reply | _Gone:
        """Send a batch and wait for the reply, the worker's death or a deadline.
        ``tried``: the tries its one item had already (the worker's own retries
        go on from there).

        Returns the reply, or why the worker is gone (it is then stopped).
        """
        if self._wire is not None and self._wire is self._farewell:
            # Told to stop after its last batch (whose reply is in): it serves no
            # more, so an item sent again alone (a reply that did not unpickle)
            # goes to a new worker instead of failing as if this one had died.
            self._stop_worker(kill=False)
        if self._wire is None:
            self._spawn()
        wire = self._wire
        if wire is None:
            raise _Cancelled
        seqs, items = zip(*batch, strict=True)
        try:
            parts, nbytes = encode((seqs, lift(items), tried) if tried else (seqs, lift(items)))
        except Exception as exc:
            raise _Unpicklable from exc
        sent = _Sent(seqs, items, nbytes, time.monotonic(), self._handed)
        self._handed += len(items)
        with contextlib.suppress(OSError):  # the worker is gone: its sentinel says so
            wire.send_parts(parts, nbytes)
        return self._await_reply(sent)

    def _await_reply(self, sent: _Sent) -> Reply | _Gone:
        """The worker's reply to ``sent`` (its oldest batch), or why it is gone (it is
        then stopped): it died, or a call in the batch passed its deadline."""
        proc, conn, wire = self._proc, self._conn, self._wire
        if proc is None or conn is None or wire is None:
            raise _Cancelled
        hung: int | None = None
        try:
            while True:
                # A reply already read along with the previous one needs no waiting.
                if not wire.has_message():
                    hung = self._readable(conn, proc, sent)
                    if hung is not None:
                        break
                try:
                    message = wire.recv()
                except Undecodable as exc:
                    raise _Garbled(
                        f"stage {self._node.name!r} returned a value that cannot be received "
                        f"from its worker process ({type(exc.error).__name__}: {exc.error}); "
                        "return plain data (an exception class whose __init__ takes other "
                        "arguments than it passes to Exception.__init__ does not unpickle: give "
                        "it a __reduce__), or use backend='thread'"
                    ) from None
                if type(message) is Unreadable:
                    raise _Garbled(
                        f"the item cannot be received by a worker process of stage "
                        f"{self._node.name!r} ({message.error}); pass plain data that the "
                        "worker can import, or use backend='thread'"
                    )
                if message == SLOT:
                    # A retry in the worker waits for its slot of the rate, like
                    # the first try did here (one item at a time under a rate).
                    assert self._limiter is not None
                    wire.send(self._limiter.reserve(1))
                    continue
                if message != SET_UP:
                    return cast("Reply", message)
                # A stateful stage's setup is over: the first call's deadline
                # counts from now (the worker noted so too), not from the send.
                sent.started = time.monotonic()
        except (OSError, EOFError):
            pass
        if self._cancelled.is_set():
            raise _Cancelled
        exitcode = self._stop_worker(kill=True)
        self._emitter.restarted()
        name = self._node.name
        if hung is not None:
            assert self._timeout is not None
            assert self._progress is not None
            tried = int(self._progress.slots[2])
            return _Gone(StageTimeout(name, self._timeout), hung, tried)
        return _Gone(WorkerCrashed(name, exitcode))

    def _readable(self, conn: Endpoint, proc: BaseProcess, sent: _Sent) -> int | None:
        """Wait for the worker's socket: None once it is readable (a reply, or the end
        of the socket); under a timeout, the index in ``sent`` of the call that passed
        its deadline first.  ``EOFError`` when the worker died without closing the
        socket (a grandchild may hold it open)."""
        poller = self._poller
        if poller is None:  # one per worker process: registering costs more than polling
            poller = self._poller = select.poll()
            poller.register(conn.fileno(), select.POLLIN)
            poller.register(proc.sentinel, select.POLLIN)
        while True:
            timeout: float | None = None
            if self._timeout is not None:
                at, deadline = self._deadline(sent)
                now = time.monotonic()
                if deadline <= now and at is not None:
                    return at
                # An infinite deadline: the worker is setting up (it says when done).
                timeout = max(0.0, deadline - now) * 1000 if deadline < math.inf else None
            events = poller.poll(timeout)
            if events:
                break
        fd = conn.fileno()
        if any(ready == fd for ready, _ in events):
            return None
        raise EOFError  # only the sentinel: the worker is gone

    def _deadline(self, sent: _Sent) -> tuple[int | None, float]:
        """Which item of ``sent`` the worker is on (None: none of them), and its deadline.

        Before the worker begins the batch, its deadline counts from ``sent.started``
        (when it was sent to an idle worker, or the reply before it came back).
        """
        assert self._timeout is not None
        assert self._progress is not None
        begun, began = self._progress.read()
        at = begun - 1 - sent.first
        if at < 0:
            # Not begun: from the send, or from the end of a setup (infinite during one).
            return None, max(sent.started, began) + self._timeout
        if at >= len(sent.items):  # done with it: its reply is on its way
            return None, time.monotonic() + self._timeout
        return at, max(began, sent.started) + self._timeout

    def _retry_alone(self, batch: list[Envelope], gone: _Gone) -> Outcome:
        """The worker died (or a call timed out) holding ``batch``: find the item to blame.

        A call past its deadline is known: the items before it were done (their
        results went with the worker) and run again, the ones after it had not
        begun.  Otherwise each item runs on its own, so that only the item that
        kills a worker fails.  Either way, some items may run twice.
        """
        at = gone.at
        if at is not None and len(batch) > 1:
            outcome = Outcome()
            for part in (batch[:at], batch[at + 1 :]):
                if part:
                    outcome.absorb(self._roundtrip(part))
            outcome.absorb(self._retry_alone([batch[at]], gone))
            return outcome
        if len(batch) > 1:
            outcome = Outcome()
            for envelope in batch:
                outcome.absorb(self._roundtrip([envelope]))
            return outcome
        (seq, item), attempt, error = batch[0], 1 + gone.tried, gone.error
        while self._options.should_retry(error, attempt):
            if self._cancelled.wait(retry.delay(self._options, attempt)):
                raise _Cancelled
            attempt += 1
            try:
                reply = self._exchange(batch, attempt - 1)
            except _Garbled as garbled:
                outcome = self._garbled(batch, garbled)
                outcome.retries += attempt - 1
                return outcome
            if not isinstance(reply, _Gone):
                outcome, raw, _ = reply
                outcome.failed = self._failures(batch, raw)
                for _, err in outcome.failed:
                    err.attempts += attempt - 1
                outcome.retries += attempt - 1
                return outcome
            error = reply.error
        failure = StageError(self._node.name, item, error, attempts=attempt)
        return Outcome(failed=[(seq, failure)], retries=attempt - 1)

    def _failures(self, batch: list[Envelope], raw: list[RawFailure]) -> list[Failed]:
        if not raw:
            return []
        items = dict(batch)
        failed: list[Failed] = []
        for seq, exc, text, attempts in raw:
            if text:
                # A failed setup stops the run with the setup's own error: the
                # worker's traceback goes with that one.
                shown = exc.error if isinstance(exc, SetupFailed) else exc
                shown.__cause__ = RemoteTraceback(text)
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
        """Wait for the pumps (and so their workers) to end.  A cancelled worker that
        is still there a second after its SIGTERM (stuck in C code, which cannot run
        the handler, or ignoring the signal) is killed."""
        now = time.monotonic()
        deadline = now + timeout
        grace = min(deadline, now + _TERM_GRACE)
        for pump in self.pumps:
            if pump.thread.ident is None:  # never started (the run failed to start)
                pump.discard()
            else:
                pump.thread.join(max(0.0, grace - time.monotonic()))
        for pump in self.pumps:
            if pump.thread.is_alive():
                pump.kill_if_cancelled()
                pump.thread.join(max(0.0, deadline - time.monotonic()))
        return not any(p.thread.is_alive() for p in self.pumps)


_deferred = threading.local()


@contextlib.contextmanager
def deferred_threads(first: threading.Thread | None = None) -> Generator[None, None, None]:
    """Process stages started inside the block start their pump threads at its end,
    after ``first`` (the run's feeder, if given).

    The scheduler starts every process stage inside one such block, before any
    other thread of the run: each stage can then fork its first workers from
    the only thread alive.  If the block raises, the threads are not started
    (the run's shutdown cancels the stages).
    """
    pending: list[threading.Thread] = [] if first is None else [first]
    outer = getattr(_deferred, "pending", None)
    _deferred.pending = pending
    try:
        yield
    finally:
        _deferred.pending = outer
    for thread in pending:
        thread.start()


_main_lock = threading.Lock()


@contextlib.contextmanager
def _main_not_imported() -> Generator[None, None, None]:
    """While a worker process is started by the forkserver or spawn: a main script
    that cannot be imported again (read from standard input: its ``__file__`` is
    ``"<stdin>"``) is not named to it, as for ``python -c``, so the worker does not
    fail trying to (its stages travel by value, see ``_main_reference``)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or main_script(main) is not None:
        yield
        return
    with _main_lock:
        del main.__file__
        try:
            yield
        finally:
            main.__file__ = path


def reaped_once(proc: BaseProcess) -> None:
    """Make ``proc``'s reaping safe from several threads, right after it started.

    Its pump, the thread closing the run (``exitcode`` before a SIGTERM) and
    multiprocessing itself (every ``Process.start`` polls the children it knows,
    from whatever thread starts one) may ask about it at the same moment; the
    ``waitpid`` of one then fails with ECHILD in another, which takes the ended
    worker for alive (a false "did not end" warning, a SIGKILL sent to a pid
    already reaped), and two readers of a forkserver worker's status split it.
    One lock per process around its poll and its signals keeps them in turn (a
    blocking poll happens only once its sentinel says it ended: never held long).
    """
    popen: Any = vars(proc)["_popen"]
    lock = threading.RLock()  # a failed signal polls (Popen._send_signal)
    poll: Callable[[int], int | None] = popen.poll
    send: Callable[[int], None] = popen._send_signal

    def locked_poll(flag: int = os.WNOHANG) -> int | None:
        with lock:
            return poll(flag)

    def locked_send(sig: int) -> None:
        with lock:
            send(sig)

    popen.poll = locked_poll
    popen._send_signal = locked_send


def _join(proc: BaseProcess, timeout: float) -> None:
    """``proc.join(timeout)``, without the import of multiprocessing.connection that
    a join with a timeout makes (5-7 ms, a good part of a short run): the
    process's sentinel is waited on here, then the exited process is reaped."""
    if proc.exitcode is None:
        poller = select.poll()
        poller.register(proc.sentinel, select.POLLIN)
        if not poller.poll(timeout * 1000):
            return
    proc.join()


def _may_fork() -> bool:
    """Whether the first workers may be forked straight from the calling thread."""
    return (
        sys.platform == "linux"
        and not os.environ.get("TYPEFLOW_START_METHOD")
        and threading.active_count() == 1
    )


def start(
    node: Node, inbox: Channel[Envelope], emitters: Sequence[Emitter], env: RunEnv
) -> ProcessGroup:
    start_method()  # a bad TYPEFLOW_START_METHOD fails the run before it starts
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # multiprocessing's own flag while a new process imports the main script
        # (as __mp_main__); it refuses to start processes then, with a message
        # about bootstrapping that does not name the cause.
        raise DefinitionError(
            f"stage {node.name!r} uses backend='process', and this run is being started "
            "by the main script's top level while a worker process imports that script; "
            "start runs under 'if __name__ == \"__main__\":' (a worker imports the script "
            "for its functions, and must not run it)"
        )
    if multiprocessing.current_process().daemon:
        raise DefinitionError(
            f"stage {node.name!r} uses backend='process', but this run is inside a worker "
            "process (of another process stage), which cannot start processes of its own; "
            f"give {node.name!r} backend='thread' or 'task', or the outer stage backend='thread'"
        )
    try:
        kernel_bytes = ship(node.kernel)
    except Exception as exc:
        fix = (
            "create what the stage object holds that cannot be pickled (locks, open "
            "files, connections, clients) in setup(), not in __init__"
            if isinstance(node.kernel, StatefulKernel)
            else "use backend='thread', or make the function and what it captures picklable"
        )
        raise DefinitionError(
            f"stage {node.name!r} cannot be sent to its worker processes "
            f"({type(exc).__name__}: {exc}); {fix}"
        ) from exc
    limiter = rate_limiter(node)  # shared by the stage's pumps
    pumps = [_Pump(node, kernel_bytes, inbox, e, i, limiter) for i, e in enumerate(emitters)]
    group = ProcessGroup(pumps)
    try:
        if _may_fork():
            inherited: list[Endpoint] = []
            for pump in pumps:
                pump.fork_now(inherited)
        pending: list[threading.Thread] | None = getattr(_deferred, "pending", None)
        for pump in pumps:
            if pending is None:
                pump.thread.start()
            else:
                pending.append(pump.thread)
    except BaseException:
        group.cancel()
        raise
    return group
