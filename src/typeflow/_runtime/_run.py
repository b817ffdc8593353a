"""The scheduler: one :class:`RunCore` owns everything a run starts.

Layout of a run over stages ``s1 .. sn``::

    items ──feeder──▶ inbox[0] ──s1 workers──▶ inbox[1] ── ... ──sn workers──▶ outbox ──▶ caller
                         ▲                        │                                ▲
                      window                      └──── failures (skip the rest) ──┘

* The feeder (a thread for a sync iterable, a task for an async one) numbers
  each item, takes a place in the *window* and puts the item into the first
  stage's inbox.  Every channel is bounded, so reading the input waits for room.
* Each stage's workers (threads, processes or tasks: see ``_backends``) emit
  successes to the next inbox and failures straight to the outbox: a failed item
  skips the later stages.
* The caller's iterator (:class:`Run`, or :class:`AsyncRun`, which share
  :class:`_Collector`) takes outcomes from the outbox, restores input order if
  asked, wraps each in a ``Result`` once, and frees its place in the window.
* End of stream is the channels' own: the feeder's ``producer_done`` closes the
  first inbox, each stage's last worker closes the next, and the caller sees
  the outbox end.  Cancelling is one call, :meth:`RunCore.shutdown`: it aborts
  every channel, cancels every worker group and joins them.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib
import itertools
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
    Sequence,
)
from itertools import repeat
from operator import itemgetter, lt, methodcaller
from types import MemberDescriptorType, TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic, TypeAlias, TypeVar, cast

from returns.result import Failure, Result, Success

from typeflow._backends._base import Outbox, WorkerBackend, WorkerGroup
from typeflow._errors import DefinitionError, StageError, StageTimeout, WorkerCrashed, short_repr
from typeflow._options import check_whole
from typeflow._runtime._channel import (
    Channel,
    ChannelAborted,
    ChannelClosed,
    EndOfChannel,
    Window,
)
from typeflow._runtime._kernel import (
    Envelope,
    FnKernel,
    Key,
    Node,
    Outcome,
    SetupFailed,
    release_callers,
    root_of,
)
from typeflow._runtime._signals import SignalGuard
from typeflow._runtime._stats import Counters, RunStatistics, StageStatistics

if TYPE_CHECKING:
    import asyncio

    from typing_extensions import Self

__all__ = ["AsyncRun", "Run", "RunCore", "default_window"]

Out = TypeVar("Out", covariant=True)

#: An outcome on its way to the caller: key, kind, and the value, the
#: StageError or the change in the number of its root's outputs; for kind
#: OKS, the keys and the values of a whole batch of successes; for kind
#: GROUP, a root and every output it will ever have, as envelopes; for kind
#: SPAN, a range of consecutive roots and every output they will ever have, in
#: order (only the caller's collector gets these: the outputs' keys are gone);
#: for kind NONE, roots that made no output at all (a range, or a tuple of them:
#: a filter's drops, a batch's absorbed items), one entry for many DELTAs of -1
#: (the caller's collector only).
Entry: TypeAlias = tuple[Any, int, Any]
#: Entry kinds.
OK: Final = 0
FAILED: Final = 1
DELTA: Final = 2
OKS: Final = 3
GROUP: Final = 4
SPAN: Final = 5
NONE: Final = 6
#: Results on their way to the caller (their type is the run's output type).
_Results: TypeAlias = list[Result[Any, StageError]]
#: Roots whose every output is known: the first, how many consecutive ones, and
#: their results in order.
_Complete: TypeAlias = tuple[int, int, Sequence[Result[Any, StageError]]]

_new_object = object.__new__


def _inner_value_setter() -> Callable[[object, object], None]:
    """What returns' constructor does to a new container: set its one slot.

    The slot's own descriptor when there is one (the fastest way in), else a
    plain ``object.__setattr__`` (returns' containers refuse ``setattr``)."""
    slot: object = getattr(Success, "_inner_value", None)
    if isinstance(slot, MemberDescriptorType):
        return slot.__set__

    def set_inner_value(container: object, value: object) -> None:
        object.__setattr__(container, "_inner_value", value)

    return set_inner_value


_set_inner_value = _inner_value_setter()


def _inner_value_getter() -> Callable[[object], object]:
    """``Success.unwrap`` without its Python frame: the slot's own descriptor when
    there is one (see :func:`_inner_value_setter`), else ``unwrap`` itself."""
    slot: object = getattr(Success, "_inner_value", None)
    if isinstance(slot, MemberDescriptorType):
        return slot.__get__
    return methodcaller("unwrap")


_inner_value = _inner_value_getter()


def _success(value: object) -> Result[Any, StageError]:
    """``Success(value)`` at a third of the cost: what the returns constructor
    does, minus its two Python-level ``__init__`` frames (one per item of every
    run; ``tests/test_runtime.py`` checks the result is a true ``Success``)."""
    result: Success[Any] = _new_object(Success)  # pyright: ignore[reportUnknownVariableType] - its parameter is Any
    _set_inner_value(result, value)
    return result


def _successes(values: Sequence[object]) -> _Results:
    """``[_success(v) for v in values]`` with the loops in C (most of a run's results),
    except for a few (slow items come one by one: the C loops cost more to set up)."""
    if len(values) < 8:
        return [_success(value) for value in values]
    results: _Results = list(map(_new_object, repeat(Success, len(values))))
    deque(map(_set_inner_value, results, values), maxlen=0)
    return results


# The run's options, checked as plain objects: the annotations say what a type
# checker accepts, not what an unchecked caller may pass.


def _check_flag(option: str, value: object) -> None:
    if not isinstance(value, bool):
        raise DefinitionError(f"{option}={value!r} is not allowed; give True or False")


def _check_window(value: object) -> None:
    if value is not None:
        hint = "give a whole number of items, at least 1 (or None for the default)"
        check_whole("run", "window", value, 1, hint)


def _check_grace(value: object) -> None:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not 0 <= value < float("inf")
    ):
        raise DefinitionError(
            f"grace={value!r} is not allowed; give the seconds a signalled run may take to "
            "drain, 0 or more"
        )


def _original(error: StageError) -> BaseException:
    """The exception a failed item's stage raised, with a note that names the stage
    and the item (its ``__cause__``, a process worker's traceback, is kept)."""
    exc = error.exception
    notes: object = getattr(exc, "__notes__", None)
    if isinstance(notes, list):
        # One exception object raised for several items (a module-level instance)
        # carries the note of the item it is raised for now, not one per failure
        # of this stage (a nested run's note, another stage's, stays).
        ours = f"(typeflow) stage {error.stage!r} failed on item "
        kept = cast("list[object]", notes)
        kept[:] = [n for n in kept if not (isinstance(n, str) and n.startswith(ours))]
    with contextlib.suppress(TypeError):  # its __notes__ is not a list: no note
        exc.add_note(f"(typeflow) {error}")
    return exc


def _error_of(outcome: Result[Any, StageError] | StageError) -> StageError:
    """The error of a ``Failure``, or the error itself (what a ``fail_fast`` run raises)."""
    return outcome if isinstance(outcome, StageError) else outcome.failure()


def _check_count(value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise DefinitionError(f"take(n) needs a whole number of results, 0 or more, not {value!r}")


def _biggest_batch(nodes: tuple[Node, ...]) -> int:
    """How many input items the largest batch needs that only input items can fill:
    a batch of batches needs the product of their sizes; behind a one-to-many stage
    one input may make a whole batch, which the window (of input items) cannot bound.
    Batches in a fork's or a route's branches count too."""
    return _batches(nodes, 1)[0]


def _batches(nodes: tuple[Node, ...], per: int) -> tuple[int, bool]:
    """:func:`_biggest_batch` of a chain whose items stand for ``per`` input items
    each, and whether a one-to-many stage in it leaves what follows unbounded by
    the input."""
    biggest = per
    for node in nodes:
        kernel = node.kernel
        if getattr(kernel, "kind", None) == "flat":
            return biggest, True
        branches: tuple[tuple[Node, ...], ...] = getattr(kernel, "branches", ())
        unbounded = False
        for branch in branches:
            size, flat = _batches(branch, per)
            biggest, unbounded = max(biggest, size), unbounded or flat
        if unbounded:  # a route with a one-to-many branch
            return biggest, True
        per *= getattr(kernel, "size", 1)
        biggest = max(biggest, per)
    return biggest, False


def _every_node(nodes: tuple[Node, ...]) -> Iterator[Node]:
    """``nodes`` and the nodes of their branches (forks, routes), at any depth."""
    for node in nodes:
        yield node
        for branch in getattr(node.kernel, "branches", ()):
            yield from _every_node(branch)


def _check_items(items: object) -> None:
    """Refuse, at ``run()``, an input that cannot be iterated (``None``, a number), and
    one string or bytes value (an iterable of characters, or of numbers, that the
    type checkers accept where a list of strings is meant)."""
    if isinstance(items, str | bytes | bytearray):
        kind = type(items).__name__
        unit = "character" if isinstance(items, str) else "byte"
        raise TypeError(
            f"run() got one {kind} value, {short_repr(items)}, which would be read {unit} "
            f"by {unit} as {len(items)} items; pass a list of items, e.g. run([value]) for "
            f"this one (or run(list(value)) if each {unit} is an item)"
        )
    if not isinstance(items, Iterable | AsyncIterable) and not hasattr(type(items), "__getitem__"):
        raise TypeError(
            f"run() needs an iterable of items, not {short_repr(items)}; pass a list, a "
            "generator, any other iterable, or an async iterable"
        )


def _results_in(entry: Entry) -> int:
    """How many results an outbox entry carries (a DELTA, or an empty GROUP, counts as one)."""
    kind = entry[1]
    if kind == OKS:
        return len(entry[0])
    return max(1, len(entry[2])) if kind in (GROUP, SPAN) else 1


def _result(entry: Entry) -> Result[Any, StageError]:
    _, kind, payload = entry
    return _success(payload) if kind == OK else Failure(cast("StageError", payload))


#: Where each kind of node runs (imported on first use: ``import typeflow`` stays light).
_BACKENDS: Final[dict[str, str]] = {
    "thread": "typeflow._backends._thread",
    "process": "typeflow._backends._process",
    "task": "typeflow._backends._task",
    "batcher": "typeflow._backends._batcher",
    "split": "typeflow._backends._split",
}


def _at_most_one_output(node: Node) -> bool:
    """Whether each item that ``node`` takes makes at most one item for the next stage
    (a map or a filter of a function)."""
    kernel = node.kernel
    return not node.runner and isinstance(kernel, FnKernel) and kernel.kind in ("map", "keep")


def _backend(kind: str) -> WorkerBackend:
    module: WorkerBackend = cast("WorkerBackend", importlib.import_module(_BACKENDS[kind]))
    return module


#: How many entries the outbox holds (at least; or the last stage's buffer).
_OUTBOX_CAPACITY: Final = 1024
#: About how many results the caller takes from the outbox at once.  Few enough
#: that the ``Success`` objects it then makes stay under the garbage collector's
#: threshold (700 new objects) while the caller frees the ones before: the
#: collector then hardly ever runs (with 1024 a run of 300 k trivial items
#: through one thread stage set it off about 300 times, a tenth of the time).
_COLLECT_RESULTS: Final = 256
#: How many places in the window the feeder takes at once (when there is room).
_WINDOW_CHUNK: Final = 64
#: How long shutdown waits for workers to end before giving up on them.
JOIN_TIMEOUT: Final = 5.0

_live_runs: weakref.WeakSet[RunCore] = weakref.WeakSet()


@atexit.register
def _shutdown_live_runs() -> None:  # pragma: no cover - runs at interpreter exit
    for core in list(_live_runs):
        core.shutdown()


def default_window(nodes: tuple[Node, ...]) -> int:
    """The default number of items in flight: room for every buffer and worker (the
    branches' of forks and routes included), twice,
    and for the results the caller takes at a time (their places come back once
    it has taken them all, see ``_Collector.settle``).

    Large enough never to slow a pipeline that keeps up (room for two of its
    largest batches: one filling while the one before is handled), small enough
    that an ordered run blocked behind one slow item holds a bounded number of
    results.
    """
    stages = max(1024, 2 * sum(n.options.buffer + n.options.workers for n in _every_node(nodes)))
    return max(stages, 2 * _biggest_batch(nodes)) + _COLLECT_RESULTS


def _inbox(node: Node, producers: int, *, numbered: bool = False) -> Channel[Envelope]:
    """A stage's input buffer; a process stage's is also bounded in bytes (large items)."""
    max_bytes = None
    if node.options.backend == "process":
        from typeflow._backends import _process

        max_bytes = _process.INBOX_BYTES
    return Channel(node.options.buffer, producers=producers, max_bytes=max_bytes, numbered=numbered)


async def _to_thread(fn: Callable[[], object]) -> None:
    """Run a blocking call (joining workers) off the caller's event loop."""
    import asyncio

    await asyncio.to_thread(fn)


class _Emitter:
    """One worker's way out: successes onward, failures to the outbox, and its counters."""

    __slots__ = ("_collected", "_next", "_outbox", "_spans", "counters")

    def __init__(
        self, next_inbox: Channel[Envelope] | None, outbox: Outbox, *, spans: bool = False
    ) -> None:
        #: None for the last stage of a chain: it sends each batch's successes as
        #: one OKS entry (read by the caller's collector, or a fork's joiner).
        self._next = next_inbox
        self._outbox = outbox
        #: Whether the outbox is the caller's collector, which takes NONE entries
        #: (a fork's joiner reads DELTAs one by one), and, from the last stage, SPANs.
        self._collected = spans
        self._spans = spans and next_inbox is None
        self.counters = Counters()

    def _route(self, outcome: Outcome) -> tuple[list[Envelope], list[Entry]]:
        ok, failed, deltas, values = outcome.ok, outcome.failed, outcome.deltas, outcome.values
        counters = self.counters
        counters.succeeded += len(ok) + len(values)
        counters.retried += outcome.retries
        entries: list[Entry] = []
        # Counted before the outputs they announce can reach the caller.
        counters.filtered += outcome.filtered
        if outcome.whole and self._next is None:
            span = outcome.span
            if span is not None and self._spans:  # the whole batch in one entry
                entries.append((span, SPAN, [value for _, value in ok]))
                ok, deltas = [], []
            else:
                ok, deltas = self._whole_roots(outcome, entries)
        if deltas:
            entries += self._delta_entries(deltas) if self._collected else _each_delta(deltas)
        if failed:
            counters.failed += len(failed)
            release_callers([err for _, err in failed])
            for key, err in failed:
                if isinstance(err.exception, StageTimeout):
                    counters.timed_out += 1
                elif isinstance(err.exception, WorkerCrashed):
                    counters.crashed += 1
                entries.append((key, FAILED, err))
        if self._next is None:
            if ok:
                keys, oks = zip(*ok, strict=True)
                entries.append((keys, OKS, oks))
            if values:
                batch_keys = outcome.keys
                if len(values) <= _COLLECT_RESULTS:
                    entries.append((batch_keys, OKS, values))
                else:  # the caller takes about _COLLECT_RESULTS at a time
                    step = _COLLECT_RESULTS
                    entries.extend(
                        (batch_keys[i : i + step], OKS, values[i : i + step])
                        for i in range(0, len(values), step)
                    )
            ok = []
        elif values:
            ok = outcome.envelopes()
        return ok, entries

    @staticmethod
    def _delta_entries(deltas: list[tuple[int, int]]) -> list[Entry]:
        """``deltas`` as entries for the caller's collector: the roots that made no
        output in one NONE entry (a range when they are consecutive), the others'
        DELTAs one by one.  A filter that drops most items, or a batch of 64,
        then costs the caller one entry, not one per item."""
        if len(deltas) < 2:
            return _each_delta(deltas)
        none = [root for root, delta in deltas if delta == -1]
        if len(none) < 2:
            return _each_delta(deltas)
        entries = _each_delta([d for d in deltas if d[1] != -1]) if len(none) < len(deltas) else []
        first = none[0]
        if none[-1] - first == len(none) - 1 and none == list(range(first, first + len(none))):
            entries.append((range(first, first + len(none)), NONE, None))
        else:
            entries.append((tuple(none), NONE, None))
        return entries

    @staticmethod
    def _whole_roots(
        outcome: Outcome, entries: list[Entry]
    ) -> tuple[list[Envelope], list[tuple[int, int]]]:
        """The roots the outcome holds whole, as one GROUP entry each (one entry for
        the caller's collector instead of a DELTA and one per output); returns the
        other outputs and deltas."""
        groups: dict[int, list[Envelope]] = {root: [] for root in outcome.whole}
        rest: list[Envelope] = []
        for envelope in outcome.ok:
            group = groups.get(root_of(envelope[0]))
            if group is None:
                rest.append(envelope)
            else:
                group.append(envelope)
        entries.extend([(root, GROUP, group) for root, group in groups.items()])
        return rest, [(root, delta) for root, delta in outcome.deltas if root not in groups]

    def emit(self, outcome: Outcome) -> None:
        ok, entries = self._route(outcome)
        if entries:  # first: a root's count must change before its outputs arrive
            self._outbox.put_many(entries)
        if ok and self._next is not None:
            self._next.put_many(ok)

    def offer(self, outcome: Outcome) -> Coroutine[Any, Any, None] | None:
        # No coroutine in the common case (there is room): a task worker's result
        # costs a few µs on the event loop, and a coroutine is a good part of that.
        ok, entries = self._route(outcome)
        if entries and not self._outbox.offer(entries):
            return self._aput(entries, ok)
        if ok and self._next is not None and not self._next.offer(ok):
            return self._aput([], ok)
        return None

    def offer_one(self, keys: Sequence[Key], value: object) -> Coroutine[Any, Any, None] | None:
        # What offer() makes of an outcome with one value (keys and values in
        # column form), without making the outcome.
        self.counters.succeeded += 1
        if self._next is None:
            entries: list[Entry] = [(keys, OKS, [value])]
            if not self._outbox.offer(entries):
                return self._aput(entries, [])
        elif not self._next.offer(ok := [(keys[0], value)]):
            return self._aput([], ok)
        return None

    async def _aput(self, entries: list[Entry], ok: list[Envelope]) -> None:
        if entries:  # first, as in emit
            await self._outbox.aput_many(entries)
        if ok and self._next is not None:
            await self._next.aput_many(ok)

    def restarted(self) -> None:
        self.counters.restarts += 1

    def done(self) -> None:
        (self._outbox if self._next is None else self._next).producer_done()


def _each_delta(deltas: list[tuple[int, int]]) -> list[Entry]:
    return [(root, DELTA, delta) for root, delta in deltas]


def _stage_statistics(
    name: str, node: Node, inbox: Channel[Envelope], emitters: list[_Emitter]
) -> StageStatistics:
    total = Counters()
    for emitter in emitters:
        for field in Counters.__slots__:
            setattr(total, field, getattr(total, field) + getattr(emitter.counters, field))
    return StageStatistics(
        name=name,
        backend=node.options.backend,
        workers=node.options.workers,
        items_in=inbox.taken,
        succeeded=total.succeeded,
        failed=total.failed,
        filtered=total.filtered,
        retried=total.retried,
        timed_out=total.timed_out,
        crashed=total.crashed,
        restarts=total.restarts,
        queued=len(inbox),
    )


def _with_branches_dropped(
    row: StageStatistics, rows: list[tuple[StageStatistics, bool]]
) -> StageStatistics:
    """A route's row: what it passed on and what failed in its branches are counted
    as it passes them on; what its branches' stages dropped is added here."""
    inside = f"{row.name}["
    dropped = sum(r.filtered for r, route in rows if not route and r.name.startswith(inside))
    return dataclasses.replace(row, filtered=row.filtered + dropped)


class _LoopThread:
    """An event loop running in its own thread, for task workers and async input."""

    def __init__(self) -> None:
        import asyncio
        from concurrent.futures import ThreadPoolExecutor

        self.loop = asyncio.new_event_loop()
        # The threads of task stages' ``asyncio.to_thread`` calls, named as the
        # run's own.  Closing the loop shuts them down without waiting: idle ones
        # end at once, a call in progress when it returns (it cannot be
        # interrupted, as a thread stage's stuck call cannot).
        self.loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix="typeflow:to_thread"))
        self._thread = threading.Thread(target=self._main, name="typeflow:loop", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        import asyncio

        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def stop(self, timeout: float) -> None:
        with contextlib.suppress(RuntimeError):  # already closed
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)


class _ReadingInput:
    """What :meth:`RunCore._reading_input` returns.

    A class, not a ``contextlib.contextmanager``: a generator that swallows an
    exception leaves it in a reference cycle (the exception's traceback holds
    the generator's frame, which from Python 3.12 holds the frame of the
    ``__exit__`` that threw into it, which holds the exception).  The cycle
    holds the feeder's frames, and with them the input, until the garbage
    collector runs: a run closed early (``take``, ``break``) kept its input open
    until then, so a merged stream it was reading went on reading its sources.
    """

    __slots__ = ("_core", "_quiet")

    def __init__(self, core: RunCore, quiet: tuple[type[BaseException], ...]) -> None:
        self._core, self._quiet = core, quiet

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        try:
            if exc is not None and not isinstance(exc, self._quiet):
                self._core.input_error = exc  # the input failed: end the run with it
        finally:
            self._core.close_input()
        return True  # nothing a feeder's input raises goes further


class RunCore:
    """Everything one run starts, and the one place that stops it."""

    def __init__(
        self,
        nodes: tuple[Node, ...],
        *,
        ordered: bool,
        fail_fast: bool,
        window: int | None,
        handle_signals: bool = False,
        grace: float = 10.0,
    ) -> None:
        for option, flag in (
            ("ordered", ordered),
            ("fail_fast", fail_fast),
            ("handle_signals", handle_signals),
        ):
            _check_flag(option, flag)
        _check_window(window)
        _check_grace(grace)
        biggest_batch = _biggest_batch(nodes)
        if window is not None and window < biggest_batch:
            raise DefinitionError(
                f"window={window!r} is smaller than a batch of {biggest_batch} items (of "
                "input items, for a batch of batches), so a batch could only ever be "
                f"flushed by its timeout; use window >= {biggest_batch}"
            )
        self.nodes = nodes
        self.ordered = ordered
        self.fail_fast = fail_fast
        self.window_size = window or default_window(nodes)
        # Each channel's producers: the feeder, then each stage's workers.
        producers = [1, *(n.options.workers for n in nodes)]
        # The first is numbered: the feeder alone puts the input's items into it,
        # in order, so an item's key is its position there.
        self.inboxes: list[Channel[Envelope]] = [
            _inbox(n, p, numbered=i == 0)
            for i, (n, p) in enumerate(zip(nodes, producers, strict=False))
        ]
        self.outbox: Channel[Entry] = Channel(
            max(_OUTBOX_CAPACITY, nodes[-1].options.buffer),
            producers=producers[-1],
            size_of=_results_in,
        )
        self.window = Window(self.window_size)
        self.input_error: BaseException | None = None
        self.started_at = 0.0
        self._emitters: list[list[_Emitter]] = []
        #: The chains inside forks and routes: label, stages, inboxes, emitters.
        self._branches: list[
            tuple[str, tuple[Node, ...], list[Channel[Envelope]], list[list[_Emitter]]]
        ] = []
        #: The label of the branch whose stages are being started ("" at the top):
        #: a fork or route inside it labels its own branches under it.
        self._chain_label = ""
        self._groups: list[WorkerGroup] = []
        self._loop: _LoopThread | None = None
        self._loop_lock = threading.Lock()
        self._feeder: threading.Thread | None = None
        self._cancel_async_feed: Callable[[], object] | None = None
        self._started = False
        self._stopped = False
        self._stop_lock = threading.Lock()
        self._stop_done = threading.Event()
        self._on_shutdown: list[Callable[[], object]] = []
        self._input_lock = threading.Lock()
        self._input_closed = False
        self._signals = SignalGuard(self.drain, self.shutdown, grace) if handle_signals else None

    # -- RunEnv --------------------------------------------------------------

    def event_loop(self) -> asyncio.AbstractEventLoop:
        with self._loop_lock:
            if self._loop is None:
                self._loop = _LoopThread()
            return self._loop.loop

    # -- starting ------------------------------------------------------------

    def start(self, items: Iterable[Any] | AsyncIterable[Any], *, caller_loop: bool) -> None:
        """Start every stage, then the feeder.

        ``caller_loop``: an async iterable is read on the running loop of the
        caller (``arun``); otherwise on the run's own loop thread.
        """
        if self._started:
            raise RuntimeError("a run can be started once")
        self._started = True
        self.started_at = time.monotonic()
        _live_runs.add(self)
        if self._signals is not None and not self._signals.install():
            self._signals = None  # not the main thread: leave signals alone
        try:
            feeder: threading.Thread | None = None
            # How many items the input holds, once all of them are in.
            known: int | None = None
            if isinstance(items, list | tuple | range):
                # Items already in memory cannot keep a feeder waiting: a short
                # input goes in at once, from here (see _pour_now); a longer one
                # in chunks (one lock trip for many).
                if len(items) <= self.inboxes[0].capacity:
                    # Read once, here: what iterating gives (a subclass may not
                    # match its len()), poured in at once if it fits.
                    items = list(items)
                    known = self._pour_now(items)
                if known is None:
                    feeder = self._feeder_for(self._feed_chunks, items)
            elif not isinstance(items, AsyncIterable):
                # Any other iterable may block between items: they go in one by
                # one, each at once.
                feeder = self._feeder_for(self._feed, items)
            self._groups += self._start_nodes(
                self.nodes,
                self.inboxes,
                self.outbox,
                self._emitters,
                first=feeder,
                known=known,
            )
            if isinstance(items, AsyncIterable):
                import asyncio

                coro = self._feed_async(items)
                if caller_loop:
                    loop = asyncio.get_running_loop()
                    task = loop.create_task(coro, name="typeflow:feeder")
                    self._cancel_async_feed = lambda: loop.call_soon_threadsafe(task.cancel)
                else:
                    future = asyncio.run_coroutine_threadsafe(coro, self.event_loop())
                    self._cancel_async_feed = future.cancel
        except BaseException:
            self.shutdown()
            raise

    def _start_nodes(
        self,
        nodes: tuple[Node, ...],
        inboxes: list[Channel[Envelope]],
        outbox: Outbox,
        emitters_out: list[list[_Emitter]] | None = None,
        first: threading.Thread | None = None,
        known: int | None = None,
    ) -> list[WorkerGroup]:
        """Start the workers of ``nodes``; ``first`` (the feeder) starts before any
        worker thread: the input is read while they start (a short run waits for
        its first item less), though after any fork (see _backends._process).

        ``known``: how many items the input holds, when all of them are in already
        (a short input in memory, see _pour_now).  A stage
        that can never get more items than that starts no more workers (the
        others are done at once): one item through a stage of 2 processes forks
        one, through a stage of 200 threads starts one.

        The last stage sends batched entries (OKS, GROUP) into ``outbox``: the
        caller's collector and a fork's joiner both read them; SPAN entries go
        to the caller's collector only (their outputs have no keys)."""
        emitters_of = [
            [
                _Emitter(
                    inboxes[i + 1] if i + 1 < len(nodes) else None,
                    outbox,
                    spans=outbox is self.outbox,
                )
                for _ in range(node.options.workers)
            ]
            for i, node in enumerate(nodes)
        ]
        if emitters_out is not None:
            emitters_out.extend(emitters_of)
        live: list[list[_Emitter]] = []
        for node, emitters in zip(nodes, emitters_of, strict=True):
            if known is not None and known < len(emitters):
                for idle in emitters[max(1, known) :]:
                    idle.done()  # a worker that could never get an item
                emitters = emitters[: max(1, known)]
            live.append(emitters)
            if not _at_most_one_output(node):
                known = None  # the stages after it may get more items than the input
        kinds = [node.runner or node.options.backend for node in nodes]
        started: dict[int, WorkerGroup] = {}
        try:
            if "process" in kinds:
                # Process stages first: their workers can be forked while the caller's
                # thread is still the only one (see _backends._process).
                from typeflow._backends import _process

                with _process.deferred_threads(first):
                    for i, node in enumerate(nodes):
                        if kinds[i] == "process":
                            started[i] = _process.start(node, inboxes[i], live[i], self)
            elif first is not None:
                first.start()
            for i, node in enumerate(nodes):
                if kinds[i] != "process":
                    started[i] = _backend(kinds[i]).start(node, inboxes[i], live[i], self)
        except BaseException:
            for group in started.values():  # e.g. forked workers whose pumps never started
                group.cancel()
                group.join(1.0)
            raise
        return [started[i] for i in range(len(nodes))]

    def window_full(self) -> bool:
        return len(self.window) >= self.window.capacity

    def start_chain(
        self, nodes: tuple[Node, ...], first: Channel[Envelope], outbox: Outbox, label: str = ""
    ) -> list[WorkerGroup]:
        inboxes = [first] + [
            _inbox(node, before.options.workers) for before, node in itertools.pairwise(nodes)
        ]
        for channel in inboxes[1:]:
            self.on_shutdown(channel.abort)
        emitters: list[list[_Emitter]] = []
        outer = self._chain_label
        # Its stages' rows come before those of the forks and routes inside it.
        label = f"{outer}/{label}" if outer else label
        place = len(self._branches)
        self._chain_label = label
        try:
            groups = self._start_nodes(nodes, inboxes, outbox, emitters)
        finally:
            self._chain_label = outer
        self._branches.insert(place, (label, nodes, inboxes, emitters))
        return groups

    def _feed(self, items: Iterable[Any]) -> None:
        # The items go in as they are (the first inbox numbers them); the window's
        # places are taken in bulk (one lock trip for many).
        inbox = self.inboxes[0]
        with self._reading_input():
            inbox.pour(items, self.window, _WINDOW_CHUNK)

    @property
    def items_read(self) -> int:
        """How many items have been taken from the input and put into the pipeline."""
        return self.inboxes[0].poured

    def _feeder_for(
        self, feed: Callable[[Iterable[Any]], None], items: Iterable[Any]
    ) -> threading.Thread:
        self._feeder = threading.Thread(
            target=feed, args=(items,), name="typeflow:feeder", daemon=True
        )
        return self._feeder

    def _pour_now(self, values: list[Any]) -> int | None:
        """Put a short input that is in memory in at once, from the caller's thread,
        and return how many items it held; None when it does not fit the first
        buffer and the window: a feeder thread reads it.  A short run then starts
        no feeder (the start of a short run is mostly thread starts)."""
        inbox, window = self.inboxes[0], self.window
        if len(values) > inbox.capacity or not window.take_now(len(values)):
            return None
        if not inbox.offer_values(values):  # too many bytes for a process stage
            window.give_back(len(values))
            return None
        self.close_input()
        return len(values)

    def _feed_chunks(self, items: Iterable[Any]) -> None:
        put_values, window = self.inboxes[0].put_values, self.window
        it = iter(items)
        with self._reading_input():
            while True:
                room = window.take_up_to(_WINDOW_CHUNK)
                chunk = list(itertools.islice(it, room))
                if len(chunk) < room:  # the end: give back the places not used
                    window.give_back(room - len(chunk))
                if chunk:
                    put_values(chunk)
                if len(chunk) < room:
                    break

    async def _feed_async(self, items: AsyncIterable[Any]) -> None:
        import asyncio

        inbox, window = self.inboxes[0], self.window
        with self._reading_input(asyncio.CancelledError):
            async for item in items:
                await window.atake()
                await inbox.aput_values([item])

    def _reading_input(self, *stops: type[BaseException]) -> _ReadingInput:
        """Around a feeder: its end, the run's end (or ``stops``) and an error of the
        input all close the input; the error is kept to be raised to the caller."""
        return _ReadingInput(self, (ChannelAborted, ChannelClosed, *stops))

    def close_input(self) -> None:
        """End of the input stream (once, whoever gets there first)."""
        with self._input_lock:
            if self._input_closed:
                return
            self._input_closed = True
        self.inboxes[0].producer_done()

    def on_shutdown(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` (once, first thing) when the run stops."""
        self._on_shutdown.append(callback)

    def drain(self) -> None:
        """Stop reading input; the items already read go on to the end."""
        self.window.abort()  # wakes a feeder waiting for room
        self.close_input()

    def release_signals(self) -> None:
        """Give SIGINT/SIGTERM back (from the thread that installed them), and raise
        what a signal received during the run stands for."""
        guard, self._signals = self._signals, None
        if guard is not None:
            guard.restore()
            guard.raise_received()

    def statistics(self, succeeded: int, failed: int, done: int) -> RunStatistics:
        """A snapshot; ``succeeded`` and ``failed`` are the results yielded so far,
        ``done`` the input items whose every outcome is known."""
        chains = [("", self.nodes, self.inboxes, self._emitters), *self._branches]
        rows = [
            (
                _stage_statistics(
                    f"{label}/{node.name}" if label else node.name, node, inbox, emitters
                ),
                getattr(node.kernel, "mode", None) == "route",
            )
            for label, nodes, inboxes, emitters_of in chains
            for node, inbox, emitters in zip(nodes, inboxes, emitters_of, strict=True)
        ]
        stages = [_with_branches_dropped(row, rows) if route else row for row, route in rows]
        read = self.items_read  # once: the feeder moves it meanwhile
        return RunStatistics(
            items_read=read,
            succeeded=succeeded,
            failed=failed,
            done=done,
            in_flight=read - done,
            elapsed=time.monotonic() - self.started_at if self.started_at else 0.0,
            stages=tuple(stages),
        )

    # -- stopping ------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop everything the run started and wait for it; safe to call again, and
        from several threads at once (each returns once the run has stopped)."""
        with self._stop_lock:
            first, self._stopped = not self._stopped, True
        if not first:
            # Another thread is stopping the run: closed means joined, so wait for it,
            # unless this is one of the run's own threads (the one it may be joining).
            if not threading.current_thread().name.startswith("typeflow:"):
                self._stop_done.wait(JOIN_TIMEOUT + 1.0)
            return
        try:
            self._stop()
        finally:
            self._stop_done.set()

    def _stop(self) -> None:
        _live_runs.discard(self)
        signals = self._signals
        if signals is None:
            self._stop_all()
            return
        signals.stopping()  # a signal from now on waits for the workers' teardowns
        try:
            self._stop_all()
        finally:
            # Given back here too, not only by release_signals(): a run left by a
            # ``break`` is shut down by garbage collection, which raises nothing.
            signals.retire()

    def _stop_all(self) -> None:
        for callback in self._on_shutdown:
            callback()
        channels: list[Channel[Any]] = [*self.inboxes, self.outbox]
        for channel in channels:
            channel.abort()
        self.window.abort()
        for group in self._groups:
            group.cancel()
        if self._cancel_async_feed is not None:
            # A feeder may wait inside the caller's async iterator: cancel it.
            with contextlib.suppress(RuntimeError):  # its loop is already closed
                self._cancel_async_feed()
        deadline = time.monotonic() + JOIN_TIMEOUT
        try:
            for group in self._groups:
                group.join(max(0.0, deadline - time.monotonic()))
            feeder = self._feeder
            if (
                feeder is not None
                and feeder.ident is not None
                and feeder is not threading.current_thread()
            ):
                # A feeder blocked inside the caller's iterator cannot be interrupted;
                # it is a daemon thread and stops at its next item.
                feeder.join(max(0.0, min(1.0, deadline - time.monotonic())))
        finally:
            if self._loop is not None:
                self._loop.stop(max(0.0, deadline - time.monotonic()))


class _Group:
    """The outcomes of one input item that has more (or fewer) than one."""

    __slots__ = ("entries", "outstanding")

    def __init__(self, outstanding: int = 1) -> None:
        self.outstanding = outstanding
        self.entries: list[Entry] = []


def _sort_key(entry: Entry) -> tuple[int, ...]:
    key = entry[0]
    return (key,) if isinstance(key, int) else key


_first = itemgetter(0)
#: The results of a root that made no output.
_NO_RESULTS: Final[tuple[Result[Any, StageError], ...]] = ()


def _all_of(root: int, keys: Sequence[Key]) -> bool:
    """Whether ``keys`` (two or more) are child keys of ``root``, each greater than the
    one before: the first and the last are ``root``'s, and tuples in between, in
    order, can only be too (compared in C)."""
    last = keys[-1]
    if type(last) is not tuple or last[0] != root:
        return False
    try:
        return all(map(lt, keys, keys[1:]))
    except TypeError:  # an input position among them: another root's
        return False


def _failures_in(results: Iterable[Result[Any, StageError]]) -> int:
    return sum(1 for r in results if type(r) is Failure)


def _in_order(entries: list[Entry]) -> _Results:
    """The results of one root's entries, siblings in the order they were made."""
    if len(entries) > 1:
        try:
            entries.sort(key=_first)  # child keys: tuples, compared in C
        except TypeError:  # the root's own key among them
            entries.sort(key=_sort_key)
    # _result inlined: one call less per output.
    return [
        _success(payload) if kind == OK else Failure(cast("StageError", payload))
        for _, kind, payload in entries
    ]


class _Collector(Generic[Out]):
    """Turns outbox entries into ``Result``s, in input order when asked.

    Each input item (a *root*) is complete when all its outputs have arrived:
    one, unless a one-to-many stage or a filter announced otherwise with a
    DELTA entry (always sent before the outputs it counts).  A complete root
    gives its place in the window back; in an ordered run its outputs are
    released in input order, siblings in the order they were made.

    The common case has a fast path: a batch of successes (an OKS entry) whose
    keys are consecutive input positions, none of them awaiting more outputs,
    is wrapped and released (or parked until its turn) as one run of results;
    so is a SPAN entry (a filter's or a one-to-many stage's batch whose items
    were each their own root, with every output they will have).
    """

    __slots__ = (
        "_core",
        "_done",
        "_failures_accepted",
        "_groups",
        "_next_seq",
        "_owed",
        "_pending",
        "_ready",
        "_released",
        "completed",
        "stopping",
    )

    def __init__(self, core: RunCore) -> None:
        self._core = core
        #: Results put into ``_ready`` so far, and failures accepted (released or
        #: held back in an ordered run): what was yielded is counted from these
        #: when asked, not per item.
        self._released = 0
        self._failures_accepted = 0
        self.completed = 0
        #: Results ready for the caller, in the order they are to be yielded.
        self._ready: deque[Result[Any, StageError]] = deque()
        self._groups: dict[int, _Group] = {}
        #: Ordered runs: complete roots waiting for their turn, by first root:
        #: how many consecutive roots the results cover, and the results.
        self._pending: dict[int, tuple[int, Sequence[Result[Any, StageError]]]] = {}
        self._next_seq = 0
        self._done = False
        #: Places in the window of items released but maybe not yet yielded.
        self._owed = 0
        #: Set when a failure stops the run (fail_fast, a setup that failed): the
        #: caller, which gets it raised, shuts the run down.
        self.stopping = False

    def accept(self, entries: list[Entry]) -> None:
        core = self._core
        for key, kind, payload in entries:
            if kind != FAILED:
                continue
            error = cast("StageError", payload)
            if isinstance(error.exception, SetupFailed):  # a stage cannot work at all
                self.stopping = True  # the caller shuts the run down (an async one off its loop)
                original = error.exception.error
                original.add_note(f"(raised by the setup of stage {error.stage!r})")
                raise original  # with its cause: a process worker's traceback
            if core.fail_fast:
                self.stopping = True
                self._released += 1
                self._failures_accepted += 1
                if isinstance(key, int) and key not in self._groups:
                    self.completed += 1  # its item's one outcome: raised
                raise error
        ordered = core.ordered
        groups = self._groups
        # Complete roots: (first root, how many consecutive roots, their results).
        complete: list[_Complete] = []
        for entry in entries:
            key, kind, payload = entry
            if kind == SPAN:
                span = cast("range", key)
                if groups and not groups.keys().isdisjoint(span):  # a root is whole or not
                    raise RuntimeError(
                        f"typeflow lost track of items: input items {span.start} to "
                        f"{span.stop - 1} came with all their outputs, but some of them "
                        "already had outputs (a bug in typeflow: please report it)"
                    )
                complete.append((span.start, len(span), _successes(payload)))
                continue
            if kind == OKS:
                keys = cast("Sequence[Key]", key)
                first = keys[0]
                if (
                    # a range: consecutive positions, found so in the worker process
                    (type(keys) is range and keys.step == 1)
                    or (type(first) is int and keys == tuple(range(first, first + len(keys))))
                ) and (not groups or groups.keys().isdisjoint(keys)):
                    assert type(first) is int
                    results = _successes(cast("tuple[object, ...]", payload))
                    complete.append((first, len(keys), results))
                    continue
                self._accept_oks(keys, cast("Sequence[object]", payload), complete)
            elif kind == DELTA:  # a root's count of outputs changes (keys: roots)
                group = groups.get(key)
                if group is not None:
                    group.outstanding += payload
                    if not group.outstanding:
                        del groups[key]
                        complete.append((key, 1, _in_order(group.entries)))
                elif payload == -1:
                    # A root's only output was dropped (a filter said no, a batch took it in).
                    complete.append((key, 1, _NO_RESULTS))
                else:  # the first news of a root with several outputs (or none)
                    groups[key] = _Group(1 + payload)
            elif kind == NONE:
                roots = cast("range | tuple[int, ...]", key)
                if groups and not groups.keys().isdisjoint(roots):  # some made outputs before
                    for root in roots:
                        self._accept_one((root, DELTA, -1), complete)
                elif type(roots) is range:
                    complete.append((roots.start, len(roots), _NO_RESULTS))
                else:
                    complete += zip(roots, repeat(1), repeat(_NO_RESULTS))
            else:
                self._accept_one(entry, complete)
        if not complete:
            return
        ready = self._ready
        released = len(ready)
        if not ordered:
            freed = 0
            for _, count, made in complete:
                ready.extend(made)
                freed += count
        else:
            pending = self._pending
            nxt = self._next_seq
            for root, count, made in complete:
                if root == nxt:
                    ready.extend(made)
                    nxt += count
                else:
                    pending[root] = (count, made)
            while nxt in pending:
                count, made = pending.pop(nxt)
                ready.extend(made)
                nxt += count
            freed = nxt - self._next_seq
            self._next_seq = nxt
        self._released += len(ready) - released
        self.completed += freed
        # Their places in the window go back to the feeder once the caller has
        # taken these results (see settle): the window counts items not yet yielded.
        self._owed += freed

    def settle(self) -> None:
        """The caller has taken every result released so far (it is about to wait for
        more): the places of their items in the window are free again."""
        owed, self._owed = self._owed, 0
        if owed:
            self._core.window.give_back(owed)

    def _accept_one(self, entry: Entry, complete: list[_Complete]) -> None:
        key, kind, payload = entry
        groups = self._groups
        if kind == GROUP:
            envelopes = cast("list[Envelope]", payload)
            if key not in groups:  # always, for a root the last stage held whole
                complete.append((key, 1, _successes([value for _, value in envelopes])))
                return
            self._accept_one((key, DELTA, len(envelopes) - 1), complete)
            for child, value in envelopes:
                self._accept_one((child, OK, value), complete)
            return
        if kind == FAILED:
            self._failures_accepted += 1
        if isinstance(key, int) and kind != DELTA and key not in groups:
            # One output for one input: complete.
            complete.append((key, 1, [_result(entry)]))
            return
        root = root_of(key)
        group = groups.get(root)
        if group is None:
            group = groups[root] = _Group()
        if kind == DELTA:
            group.outstanding += cast("int", payload)
        elif self._core.ordered:
            group.outstanding -= 1
            group.entries.append(entry)
        else:
            group.outstanding -= 1
            self._ready.append(_result(entry))
            self._released += 1
        if group.outstanding == 0:
            del groups[root]
            complete.append((root, 1, _in_order(group.entries)))

    def _accept_oks(
        self,
        keys: Sequence[Key],
        values: Sequence[object],
        complete: list[_Complete],
    ) -> None:
        """:meth:`_accept_one` for each output of an OKS entry off the fast path (the
        outputs of a stage behind a one-to-many one), without an entry for each.  A
        root completes at once when two or more of its outputs come next, in order,
        and are all it waits for: all it has (ordered runs: none held before them),
        or all it has left (unordered runs, whose outputs are never held)."""
        groups, ready, ordered = self._groups, self._ready, self._core.ordered
        i, size = 0, len(keys)
        if len(values) != size:
            raise RuntimeError(
                f"typeflow lost track of items: a batch of {size} outputs came with "
                f"{len(values)} values (a bug in typeflow: please report it)"
            )
        group: _Group | None
        while i < size:
            key, value = keys[i], values[i]
            if isinstance(key, int):
                i += 1
                if key not in groups:  # one output for one input: complete
                    complete.append((key, 1, [_success(value)]))
                    continue
                root = key
                group = groups[root]
            else:
                root = key[0]
                group = groups.get(root)
                if group is not None and not group.entries:  # none of its outputs held
                    end = i + group.outstanding
                    if end - i > 1 and end <= size and _all_of(root, keys[i:end]):
                        # Every output the root waits for, together and in order (the
                        # common case: siblings travel together): complete at once.
                        del groups[root]
                        results = _successes(values[i:end])
                        if ordered:
                            complete.append((root, 1, results))
                        else:
                            ready.extend(results)
                            self._released += len(results)
                            complete.append((root, 1, _NO_RESULTS))
                        i = end
                        continue
                i += 1
            if group is None:
                group = groups[root] = _Group()
            group.outstanding -= 1
            if ordered:
                group.entries.append((key, OK, value))
            else:
                ready.append(_success(value))
                self._released += 1
            if not group.outstanding:
                del groups[root]
                complete.append((root, 1, _in_order(group.entries)))

    def pop(self) -> Result[Out, StageError] | None:
        if not self._ready:
            return None
        return cast("Result[Out, StageError]", self._ready.popleft())

    def take_ready(self, first: Result[Any, StageError]) -> _Results:
        """``first`` (just popped) and every result ready after it, taken at once: a
        caller that takes them all pays for one call, not one ``next()`` each."""
        ready = self._ready
        taken = [first, *ready]
        ready.clear()
        return taken

    def yielded(self) -> tuple[int, int]:
        """How many successes and failures the caller has been given so far."""
        waiting = list(self._ready)  # a copy: the caller's thread may be popping
        failed = self._failures_accepted - _failures_in(waiting) - self._failures_held()
        return self._released - len(waiting) - failed, failed

    def _failures_held(self) -> int:
        """Failures accepted but not released yet: in an ordered run, those of complete
        roots waiting for their turn, and of roots waiting for more outputs."""
        parked = [r for _, results in list(self._pending.values()) for r in results]
        entries = [e for group in list(self._groups.values()) for e in list(group.entries)]
        return _failures_in(parked) + sum(1 for _, kind, _ in entries if kind == FAILED)

    def close(self) -> None:
        """The caller closed the run: drop what it has not taken (not counted as yielded)."""
        self._done = True
        dropped = list(self._ready)
        self._failures_accepted -= _failures_in(dropped) + self._failures_held()
        self._released -= len(dropped)
        self._ready.clear()
        self._pending.clear()
        self._groups.clear()
        self._core.shutdown()
        self._core.release_signals()

    def finish(self) -> None:
        """The outbox ended: stop the run; raise for a signal, or the input's error."""
        self._done = True
        core = self._core
        core.shutdown()
        core.release_signals()
        if core.input_error is not None:
            error, core.input_error = core.input_error, None
            raise error
        waiting = len(self._groups) + sum(count for count, _ in self._pending.values())
        # Items that never reached the caller in any form count too (read, and not
        # completed, nor waiting for more outputs).
        waiting = max(waiting, core.items_read - self.completed)
        if waiting:
            # Every stage has ended, so these can never be released: say so loudly
            # rather than end the run as if nothing were missing.
            raise RuntimeError(
                f"typeflow lost track of items: every stage has ended, but the results of "
                f"{waiting} input item(s) still wait for outputs that never came "
                "(a bug in typeflow: please report it)"
            )

    def aborted(self) -> None:
        """The run was cancelled from elsewhere (a second signal, the grace period)."""
        self._done = True
        self._core.shutdown()
        self._core.release_signals()


class Run(Iterator["Result[Out, StageError]"], Generic[Out]):
    """A running pipeline: an iterator of one ``Result`` per input item.

    The run starts on the first ``next()``.  Closing it -- ``close()``, leaving a
    ``with`` block, ``break`` followed by garbage collection, an exception or
    KeyboardInterrupt while iterating -- stops and joins every worker thread,
    task and process.

    If the input iterable raises, the items read before it are still processed
    and yielded, then the iterable's exception is raised.
    """

    __slots__ = ("__weakref__", "_collector", "_core", "_items")

    def __init__(self, core: RunCore, items: Iterable[Any] | AsyncIterable[Any]) -> None:
        _check_items(items)  # None included: it also means "started" below
        self._core = core
        self._items: Iterable[Any] | AsyncIterable[Any] | None = items
        self._collector: _Collector[Out] = _Collector(core)

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Result[Out, StageError]:
        collector = self._collector
        ready = collector._ready  # pyright: ignore[reportPrivateUsage] - the hot path, inlined
        if ready:
            return ready.popleft()  # no cast(): a call per item
        if collector._done:  # pyright: ignore[reportPrivateUsage]
            raise StopIteration
        core = self._core
        try:
            self.start()
            while True:
                collector.settle()
                try:
                    entries = core.outbox.get_many(_COLLECT_RESULTS)
                except EndOfChannel:
                    collector.finish()
                    raise StopIteration from None
                except ChannelAborted:  # cancelled from elsewhere
                    collector.aborted()
                    raise StopIteration from None
                collector.accept(entries)
                result = collector.pop()
                if result is not None:
                    return result
        except BaseException:
            core.shutdown()
            core.release_signals()
            raise

    def close(self) -> None:
        """Stop the run now: every worker is stopped and joined."""
        self._collector.close()

    def _async_twin(self) -> AsyncRun[Out]:
        """The same started run, read with ``async for`` (a feed's): one stream of
        results, whichever of the two takes each."""
        self.start()
        return AsyncRun(self._core, None, self._collector, owns=False)

    def take(self, n: int, /) -> list[Result[Out, StageError]]:
        """The next ``n`` results (fewer if the run ends first); then the run is closed,
        which stops every stage upstream.

        Example:
            >>> import itertools
            >>> from typeflow import stage
            >>> @stage
            ... def square(x: int) -> int:
            ...     return x * x
            >>> [r.unwrap() for r in square.run(itertools.count()).take(3)]
            [0, 1, 4]
        """
        _check_count(n)
        try:
            return list(itertools.islice(self, n))
        finally:
            self.close()

    def consume(self) -> list[StageError]:
        """Run to the end, dropping the successes; return the failures.

        For pipelines run for their effects (writing files, rows, messages).
        """
        failures: list[StageError] = []
        for result in self:
            results = self._collector.take_ready(result)
            failures += [r.failure() for r in results if type(r) is Failure]
        return failures

    def values(self) -> Generator[Out, None, None]:
        """The values alone, as calling the stages one after the other would give
        them: the first failure closes the run and raises the original exception
        (a ``KeyError`` is a ``KeyError``), with a note naming the stage and the
        item.  Leaving the loop early closes the run too.  With ``fail_fast=True`` it
        is the same.  (A stage's ``StopIteration`` comes as a ``RuntimeError``, as
        from any generator: it must not end the caller's loop as if the values
        had run out.)

        Example:
            >>> from typeflow import stage
            >>> @stage
            ... def inverse(x: int) -> float:
            ...     return 1 / x
            >>> list(inverse.run([1, 2, 4]).values())
            [1.0, 0.5, 0.25]
            >>> list(inverse.run([1, 0, 4]).values())
            Traceback (most recent call last):
            ...
            ZeroDivisionError: division by zero
            (typeflow) stage 'inverse' failed on item 0: ZeroDivisionError: division by zero
        """
        # The results already waiting are taken here, each at the moment it is
        # handed out (for the statistics and any other reader of the run), without
        # a call of __next__ and unwrap() each: a fifth of the caller's time per item.
        ready = self._collector._ready  # pyright: ignore[reportPrivateUsage] - the hot path
        popleft = ready.popleft
        try:
            while True:
                result = popleft() if ready else self._next_or_error()
                if result is None:
                    return
                if type(result) is Success:
                    yield cast("Out", _inner_value(cast("object", result)))
                    continue
                raise _original(_error_of(result))
        finally:
            self.close()

    def _next_or_error(self) -> Result[Out, StageError] | StageError | None:
        """The next result; the error a ``fail_fast`` run raises; None at the end."""
        try:
            return next(self)
        except StopIteration:
            return None
        except StageError as error:
            return error

    def start(self) -> Self:
        """Start the workers and begin reading input now, before the first ``next()``."""
        if self._items is not None:
            items, self._items = self._items, None
            try:
                self._core.start(items, caller_loop=False)
            except BaseException:
                self._core.shutdown()
                self._core.release_signals()
                raise
        return self

    def statistics(self) -> RunStatistics:
        """Per-stage counters so far: items in, succeeded, failed, filtered, retried,
        timed out, crashed, workers restarted.  Safe to call at any time, also after
        the run."""
        c = self._collector
        return self._core.statistics(*c.yielded(), c.completed)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            _shutdown_when_dropped(self._core)


class AsyncRun(AsyncIterator["Result[Out, StageError]"], Generic[Out]):
    """The async twin of :class:`Run`: ``async for result in pipeline.arun(items)``.

    Waiting for results never blocks the caller's event loop.  Close it with
    ``await aclose()`` or ``async with``.
    """

    __slots__ = ("__weakref__", "_collector", "_core", "_items", "_owns")

    def __init__(
        self,
        core: RunCore,
        items: Iterable[Any] | AsyncIterable[Any] | None,
        collector: _Collector[Out] | None = None,
        *,
        owns: bool = True,
    ) -> None:
        #: False for a feed's ``async for``: the feed owns the run, and leaving the
        #: loop early (``break``, an exception, a timeout or a cancelled wait) leaves
        #: it running, as a ``for`` loop over the feed does.
        self._owns = owns
        if collector is None:
            _check_items(items)  # None included: it also means "started" below
        self._core = core
        #: None once started (or started by the sync twin whose ``collector`` it shares).
        self._items = items
        self._collector: _Collector[Out] = _Collector(core) if collector is None else collector

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Result[Out, StageError]:
        collector = self._collector
        result = collector.pop()
        if result is not None:
            return result
        if collector._done:  # pyright: ignore[reportPrivateUsage]
            raise StopAsyncIteration
        core = self._core
        try:
            if self._items is not None:
                items, self._items = self._items, None
                core.start(items, caller_loop=True)
            while True:
                collector.settle()
                try:
                    entries = await core.outbox.aget_many(_COLLECT_RESULTS)
                except EndOfChannel:
                    await self._finish()
                    raise StopAsyncIteration from None
                except ChannelAborted:
                    collector._done = True  # pyright: ignore[reportPrivateUsage]
                    raise StopAsyncIteration from None
                collector.accept(entries)
                result = collector.pop()
                if result is not None:
                    return result
        except BaseException:
            if self._owns or collector.stopping:
                await self._shutdown()
            raise

    async def _finish(self) -> None:
        await _to_thread(self._core.shutdown)
        self._collector.finish()

    async def _shutdown(self) -> None:
        # Joining workers blocks: do it off the caller's event loop.
        await _to_thread(self._core.shutdown)

    async def aclose(self) -> None:
        """Stop the run now: every worker is stopped and joined."""
        await _to_thread(self._collector.close)

    async def values(self) -> AsyncGenerator[Out, None]:
        """The async twin of :meth:`Run.values`: the values alone; the first failure
        closes the run and raises the original exception.  An async generator is
        closed only when it is finished or closed: leave the loop early inside
        ``async with pipeline.arun(items) as run:``, which closes the run."""
        ready = self._collector._ready  # pyright: ignore[reportPrivateUsage] - as in Run.values
        popleft = ready.popleft
        try:
            while True:
                result = popleft() if ready else await self._anext_or_error()
                if result is None:
                    return
                if type(result) is Success:
                    yield cast("Out", _inner_value(cast("object", result)))
                    continue
                raise _original(_error_of(result))
        finally:
            await self.aclose()

    async def _anext_or_error(self) -> Result[Out, StageError] | StageError | None:
        """The next result; the error a ``fail_fast`` run raises; None at the end."""
        try:
            return await anext(self)
        except StopAsyncIteration:
            return None
        except StageError as error:
            return error

    def statistics(self) -> RunStatistics:
        """Per-stage counters so far: items in, succeeded, failed, filtered, retried,
        timed out, crashed, workers restarted.  Safe to call at any time, also after
        the run."""
        c = self._collector
        return self._core.statistics(*c.yielded(), c.completed)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if not self._owns:
            return
        with contextlib.suppress(Exception):
            _shutdown_when_dropped(self._core)


def _shutdown_when_dropped(core: RunCore) -> None:
    """Shut down a run that nobody holds any more.  Dropped on an event loop (a
    ``break`` out of ``async for`` without ``aclose``), the workers are joined off
    the loop; collected by the garbage collector in one of typeflow's own threads
    (a worker of this run or another one, which cannot join itself or should not
    wait), in a thread of its own.  Else, as a ``break`` promises, at once."""
    if threading.current_thread().name.startswith("typeflow:") or _on_running_loop():
        threading.Thread(target=core.shutdown, name="typeflow:shutdown", daemon=True).start()
    else:
        core.shutdown()


def _on_running_loop() -> bool:
    """Whether this thread is running an event loop (asyncio is not imported for it)."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return False
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
