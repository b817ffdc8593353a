"""What a worker does with a batch of items, written once for every backend.

A pipeline is compiled into a tuple of :class:`Node`: a name, the stage's
options and a :class:`Kernel`.  A kernel turns a batch of envelopes
``(seq, item)`` into an :data:`Outcome`: the envelopes that go on and the
failures, each already a :class:`~typeflow.StageError`.  Backends only move
batches to a kernel and outcomes away from it; they never look at items.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
import sys
import threading
from collections.abc import AsyncIterable, Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias, cast

from typeflow._errors import StageError, StageTimeout, exception_chain, is_own_frame

if TYPE_CHECKING:
    import asyncio
from typeflow._options import StageOptions
from typeflow._runtime import _retry as retry

__all__ = [
    "Envelope",
    "Failed",
    "FirstCall",
    "FnKernel",
    "Kernel",
    "Key",
    "Kind",
    "Node",
    "Outcome",
    "WorkerContext",
    "WorkerExit",
    "child_key",
    "item_error",
    "root_of",
    "rows",
]

#: Where an item comes from: its position in the input (a "root"), or, for the
#: outputs of one-to-many stages, the root followed by the output's position
#: among its siblings at each such stage that made more than one (or none) of
#: them: an item's only output keeps its key (see :func:`child_key`).
Key: TypeAlias = int | tuple[int, ...]
#: An item in flight: its key, and its current value.
Envelope: TypeAlias = tuple[Key, object]
#: A failed item: its key, and the error.
Failed: TypeAlias = tuple[Key, StageError]

#: ``list`` itself, typed as a factory of any list (for the dataclass fields below).
_list = cast("Callable[[], list[Any]]", list)


def _split(batch: list[Envelope]) -> tuple[tuple[Key, ...], tuple[object, ...]]:
    """A batch's keys and its items apart (the inverse of :func:`rows`)."""
    keys, items = zip(*batch, strict=True)
    return keys, items


def rows(keys: Sequence[Key], items: Sequence[object]) -> list[Envelope]:
    """A batch taken as columns (``Channel.get_columns``), as envelopes again: for
    the paths that want them (a failed batch, a call under a deadline, a retry)."""
    return list(zip(keys, items, strict=True))


def root_of(key: Key) -> int:
    """The position in the input that ``key`` descends from."""
    return key if isinstance(key, int) else key[0]


def child_key(key: Key, index: int) -> Key:
    """The key of output number ``index`` made from the item keyed ``key``, when the
    item made several (or none).  An item's one output keeps the item's key: its
    root's count of outputs does not change, and in order there is nothing to sort
    it against, so it costs no more downstream than a map's output."""
    return (key, index) if isinstance(key, int) else (*key, index)


@dataclass(slots=True)
class Outcome:
    """What a kernel makes of a batch.

    Attributes:
        ok: the envelopes that go on.
        failed: the failures.
        retries: how many extra tries the batch took.
        deltas: for each item that did not make exactly one output, its root
            and (outputs - 1): -1 for an item filtered out, +2 for an item
            that made three.  The caller counts a root's outputs with them.
        filtered: how many items were dropped on purpose (a filter said no, or
            a one-to-many call made nothing).
        keys, values: the common case in column form, cheaper to make, to
            pickle and to pass on than pairs: every item of the batch made one
            output, ``values[i]`` from the item keyed ``keys[i]`` (the batch's
            keys, in order; a ``range`` when they are consecutive positions).
            Empty otherwise; a kernel fills either these or ``ok``, never both.
        whole: roots whose every output is in ``ok`` (none, for a filtered
            one): the item was the root itself, not one of several items a
            stage before made from it.  A hint only (``deltas`` still count
            them): the last stage hands such a root to the caller as one entry.
        span: set when every item of the batch was such a root, the batch's
            keys were the consecutive positions ``span``, and nothing failed:
            ``ok`` then holds every output of those roots, in input order.  A
            hint too: the run's last stage hands the whole batch to the caller
            as one entry.
    """

    # Plain ``list`` factories: calling ``list[X]()`` costs ten times ``list()`` (the
    # alias tries to tag the new list with its type), and an Outcome is made per batch.
    ok: list[Envelope] = field(default_factory=_list)
    failed: list[Failed] = field(default_factory=_list)
    retries: int = 0
    deltas: list[tuple[int, int]] = field(default_factory=_list)
    filtered: int = 0
    keys: Sequence[Key] = ()
    values: list[object] = field(default_factory=_list)
    whole: list[int] = field(default_factory=_list)
    span: range | None = None

    def envelopes(self) -> list[Envelope]:
        """Every output that goes on, as envelopes, whichever form it is in."""
        if not self.values:
            return self.ok
        return [*self.ok, *zip(self.keys, self.values, strict=True)]

    def __reduce__(self) -> tuple[type[Outcome], tuple[object, ...]]:
        # A process worker pickles one per batch: its fields as a plain tuple make a
        # smaller pickle, quicker both ways, than the slots' state that pickle makes
        # by default (a dict of every slot, set one by one on the other side).
        return Outcome, (
            self.ok,
            self.failed,
            self.retries,
            self.deltas,
            self.filtered,
            self.keys,
            self.values,
            self.whole,
            self.span,
        )

    def absorb(self, other: Outcome) -> None:
        """Add what ``other`` holds to this outcome (its outputs as envelopes).

        Every field counts: an output, a failure, a retry, and a filter's or a
        one-to-many stage's delta (without which the run would wait for an
        output that never comes).
        """
        self.ok += other.envelopes()
        self.failed += other.failed
        self.retries += other.retries
        self.deltas += other.deltas
        self.filtered += other.filtered
        self.whole += other.whole
        self.span = None  # pieces of several batches


class Gather:
    """The outcomes of one-item calls on a batch, gathered into one outcome.

    For a batch run one call at a time (under a timeout, each call has its own
    deadline).  While every item has made exactly one output, the outputs stay
    in column form, as a batch run at once would leave them.
    """

    __slots__ = ("_columns", "_keys", "_out", "_values", "done")

    def __init__(self, keys: Sequence[Key]) -> None:
        self._keys = keys
        self._out = Outcome()
        self._values: list[object] = []
        self._columns = True
        #: How many items have been added (the first ``done`` of the batch).
        self.done = 0

    def add(self, more: Outcome) -> None:
        """The outcome of the call on the batch's next item."""
        if self._columns and more.values:
            self._values.append(more.values[0])
        else:
            if self._columns:  # from here on, outputs as envelopes
                self._out.ok = list(zip(self._keys, self._values, strict=False))
                self._columns = False
            self._out.absorb(more)
        self.done += 1

    def outcome(self) -> Outcome:
        """What the items added so far came to."""
        out = self._out
        if self._columns and self._values:
            done = self.done
            out.keys = self._keys if done == len(self._keys) else self._keys[:done]
            out.values = self._values
        return out


class FirstCall:
    """A plain (sync) function until one of its calls has returned: a coroutine
    then means an async function that does not look like one (a lambda or a
    wrapper around one, a decorated ``async def``), which would go on unawaited
    -- into the next stage, or as a predicate's always-true verdict.  That is an
    error that says so; anything else, and the function is called directly from
    then on (``vetted``)."""

    __slots__ = ("_name", "_owner", "fn")

    def __init__(self, name: str, fn: Callable[[Any], Any], owner: _Vetted | None) -> None:
        self._name, self.fn, self._owner = name, fn, owner

    def __call__(self, item: object) -> object:
        value = self.fn(item)
        if inspect.iscoroutine(value):
            value.close()  # never awaited, on purpose: no warning
            raise TypeError(
                f"the function of {self._name!r} returned a coroutine: it is asynchronous "
                "but not an 'async def' function (a lambda or a wrapper that calls one), so "
                "it was taken for a plain one and nothing would await it; make it an 'async "
                "def' (async def f(x): return await g(x)), decorators' wrappers included"
            )
        if self._owner is not None:
            self._owner.vetted()
        return value


class _Vetted(Protocol):
    def vetted(self) -> None: ...


class WorkerExit(BaseException):
    """Ends a worker now (a process worker told to stop); never an item's failure."""


class WorkerContext:
    """State that belongs to one worker (one thread, one process, one task).

    It owns the event loop that runs ``async def`` functions on thread and
    process workers, created on first use and closed when the worker ends.
    """

    __slots__ = ("_runner", "index", "pacer", "scope", "setup_failure", "state")

    def __init__(self, index: int, scope: SharedScope | None = None) -> None:
        self.index = index
        #: What the stage's workers in this process share in this run (a stateful
        #: stage's object, with ``shared=True``); None where a worker is alone in its
        #: process (a process worker).
        self.scope = scope
        #: Told when the tries of a retried call end and begin (its backend's
        #: deadlines and rate limit); None when nothing needs to know.
        self.pacer: retry.Pacer | None = None
        self._runner: asyncio.Runner | None = None
        #: What a stateful stage built for this worker (see :class:`StatefulKernel`).
        self.state: WorkerState | None = None
        #: What its ``setup`` raised, when :meth:`Kernel.prepare` ran it.
        self.setup_failure: BaseException | None = None

    def run_coroutine(self, coro: Coroutine[Any, Any, object]) -> object:
        if self._runner is None:
            import asyncio

            self._runner = asyncio.Runner()
        return self._runner.run(coro)

    def close(self) -> None:
        """End of the worker: tear its state down, then close its event loop."""
        try:
            if self.state is not None:
                state, self.state = self.state, None
                _tear_down(state, self)
        finally:
            if self._runner is not None:
                self._runner.close()
                self._runner = None

    async def aclose(self) -> None:
        """End of a task worker: tear its state down on the running loop."""
        if self.state is not None:
            state, self.state = self.state, None
            try:
                await state.ateardown()
            except BaseException as exc:  # noqa: BLE001 - no item left to fail: logged
                state.teardown_failed(exc, self.index)


class WorkerState:
    """One worker's own instance of a stateful stage, set up in that worker."""

    __slots__ = ("instance", "kernel")

    def __init__(self, instance: Any, kernel: Kernel) -> None:
        self.instance = instance
        self.kernel = kernel

    def teardown(self, ctx: WorkerContext) -> None:
        result = self.instance.teardown()
        if inspect.isawaitable(result):
            ctx.run_coroutine(cast("Coroutine[Any, Any, object]", result))

    async def ateardown(self) -> None:
        result = self.instance.teardown()
        if inspect.isawaitable(result):
            await result

    def teardown_failed(self, exc: BaseException, worker: int) -> None:
        """A teardown raised.  Every item of the worker is done by then, so there is
        nothing to fail: the error is logged (logger ``typeflow``; to standard error
        when logging is not set up) and the worker ends as usual."""
        import logging

        logging.getLogger("typeflow").error(
            "the teardown of stage %r failed in its worker %d",
            self.kernel.name,
            worker,
            exc_info=exc,
        )


class SharedScope:
    """What the workers of one stage in one process share during one run: a
    ``shared=True`` stateful stage's object, set up by the first worker that needs
    it and torn down by the last worker of the stage to end (whether it used the
    object or not: the first may well end before the others begin)."""

    __slots__ = ("failure", "live", "lock", "setting_up", "state")

    def __init__(self, workers: int) -> None:
        self.lock = threading.Lock()
        self.state: WorkerState | None = None
        #: What the shared ``setup`` raised: every worker fails as its own would.
        self.failure: BaseException | None = None
        #: Set while a task worker awaits the shared ``setup``; the others wait for it.
        self.setting_up: asyncio.Future[None] | None = None
        #: Workers started or about to start and not ended yet.
        self.live = workers

    def hold(self, ctx: WorkerContext, state: WorkerState) -> None:
        """``ctx``'s worker uses ``state``, this scope's from now on (with the lock
        held, or on the one thread of a task backend's workers)."""
        self.state = state
        ctx.state = _SharedUse(state.instance, state.kernel)

    def enter(self) -> None:
        """One more worker (a thread worker replacing one whose call is abandoned)."""
        with self.lock:
            self.live += 1

    def _last(self) -> WorkerState | None:
        with self.lock:
            self.live -= 1
            if self.live > 0:
                return None
            state, self.state = self.state, None
            return state

    def leave(self, ctx: WorkerContext) -> None:
        """A worker ends; the last one tears the shared object down."""
        state = self._last()
        if state is not None:
            _tear_down(state, ctx)

    async def aleave(self, ctx: WorkerContext) -> None:
        """:meth:`leave` for a task worker, on the loop."""
        state = self._last()
        if state is not None:
            await _ateardown(state, ctx.index)

    async def aclose(self) -> None:
        """After the stage's task workers: tear down what is left (a worker cancelled
        before it began never leaves)."""
        state, self.state = self.state, None
        if state is not None:
            await _ateardown(state, 0)


def _tear_down(state: WorkerState, ctx: WorkerContext) -> None:
    """``state``'s teardown, on ``ctx``'s worker; an error is logged (no item is left
    to fail), a ``WorkerExit`` ends the worker as always."""
    try:
        state.teardown(ctx)
    except WorkerExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - no item left to fail: logged
        state.teardown_failed(exc, ctx.index)


async def _ateardown(state: WorkerState, worker: int) -> None:
    try:
        await state.ateardown()
    except BaseException as exc:  # noqa: BLE001 - no item left to fail: logged
        state.teardown_failed(exc, worker)


class _SharedUse(WorkerState):
    """A worker's use of a :class:`SharedScope`'s object: its own teardown does
    nothing (the scope tears the object down once, after the last worker)."""

    __slots__ = ()

    def teardown(self, ctx: WorkerContext) -> None:
        pass

    async def ateardown(self) -> None:
        pass


class Kernel:
    """Processes batches for one stage.  Must pickle (process workers get a copy)."""

    __slots__ = ("is_async", "name", "one")

    def __init__(self, name: str, is_async: bool) -> None:
        self.name = name
        self.is_async = is_async
        #: The ``async def`` function itself when awaiting it is all that an item
        #: takes (a map without retries or a timeout): a task worker awaits it
        #: directly for a batch of one, the common case of slow items, without a
        #: batch's bookkeeping (see :meth:`one_failed`).  None otherwise.
        self.one: Callable[[Any], Awaitable[object]] | None = None

    def process(self, batch: list[Envelope], ctx: WorkerContext) -> Outcome:
        """Run the batch in a thread or process worker."""
        raise NotImplementedError

    def needs_setup(self, ctx: WorkerContext) -> bool:
        """Whether :meth:`prepare` has something to do for this worker."""
        return False

    def prepare(self, ctx: WorkerContext) -> None:
        """Set the worker up before its first call (a stateful stage's ``setup``),
        so that a timed worker starts its first call's deadline after it: a
        stage's ``timeout`` is for one call, not for the setup."""

    def process_columns(
        self, keys: Sequence[Key], items: Sequence[object], ctx: WorkerContext
    ) -> Outcome:
        """:meth:`process` for a batch that comes as its keys and its items apart
        (as workers take it: see ``Channel.get_columns``)."""
        return self.process(rows(keys, items), ctx)

    async def aprocess(self, batch: list[Envelope], ctx: WorkerContext) -> Outcome:
        """Run the batch in an asyncio task worker."""
        raise NotImplementedError

    def one_failed(self, key: Key, item: object, exc: BaseException) -> Outcome:
        """The outcome of an item whose call through :attr:`one` raised ``exc`` (what
        :meth:`aprocess_columns` would have made of it); re-raised when it ends the
        worker rather than the item (see :func:`item_error`)."""
        out = Outcome()
        out.failed.append((key, item_error(self.name, item, exc)))
        return out

    async def aprocess_columns(
        self, keys: Sequence[Key], items: Sequence[object], ctx: WorkerContext
    ) -> Outcome:
        """The awaitable twin of :meth:`process_columns`."""
        return await self.aprocess(rows(keys, items), ctx)


#: What a function-backed kernel does with each call's result.
#:
#: * ``"map"``: the result is the one output;
#: * ``"flat"``: the result is an iterable (or async iterable) of outputs;
#: * ``"keep"``: the result is a predicate's verdict: the item goes on, or not.
Kind: TypeAlias = Literal["map", "flat", "keep"]


class FnKernel(Kernel):
    """Calls the stage's function once per item, and places what it returns.

    ``fn`` is awaited when it is ``async def`` (an async generator is drained for
    ``"flat"``).  A failing call is retried in place when the stage asks for
    retries.  The timeout of an ``async def`` function is applied here, by
    cancelling the call; a plain function's timeout is the backend's business
    (it cannot be interrupted from inside its own thread).  A one-to-many call
    is all or nothing: if it fails part way, its item fails and none of the
    outputs it made go on.
    """

    __slots__ = ("_generates", "_plain", "fn", "kind", "options")

    def __init__(
        self,
        name: str,
        fn: Callable[[Any], Any],
        is_async: bool,
        options: StageOptions,
        kind: Kind = "map",
    ) -> None:
        super().__init__(name, is_async)
        self._plain = fn
        #: What the loops call: a plain function is vetted by its first call.
        self.fn: Callable[[Any], Any] = fn if is_async else FirstCall(name, fn, self)
        self.options = options
        self.kind = kind
        #: An async generator function (a one-to-many stage's), drained per call.
        self._generates = kind == "flat" and inspect.isasyncgenfunction(fn)
        if is_async and kind == "map" and not options.retries and options.timeout is None:
            self.one = fn

    def __reduce__(self) -> tuple[object, ...]:
        fn = self._plain
        reference = _main_reference(fn, self)
        if reference is not None:
            return (_kernel_of_stage, reference)
        return (FnKernel, (self.name, fn, self.is_async, self.options, self.kind))

    def vetted(self) -> None:
        """The function's first call returned a plain value: call it directly now."""
        self.fn = self._plain

    # -- one call ------------------------------------------------------------

    def _call(self, item: object) -> object:
        """The sync call, with its result made concrete (a generator is drained, a
        filter's verdict made a bool: either may raise, as part of the call)."""
        value = self.fn(item)
        if self.kind == "flat":
            return list(cast("Iterable[object]", value))
        if self.kind == "keep":
            return bool(value)
        return value

    async def _acall_once(self, item: object) -> object:
        if self._generates:
            return [x async for x in cast("AsyncIterable[object]", self.fn(item))]
        value = await self.fn(item)
        if self.kind == "flat":
            return list(cast("Iterable[object]", value))
        if self.kind == "keep":
            return bool(value)
        return value

    async def _acall(self, item: object, ctx: WorkerContext) -> tuple[object, int]:
        return await retry.acall(self._acall_once, item, self.options, self.name, ctx.pacer)

    def _place(self, out: Outcome, key: Key, item: object, value: object) -> None:
        """Put one call's result into ``out`` by the stage's kind.  The common path of
        filters and one-to-many stages, :meth:`_shape_columns`, inlines these rules
        (a call per item was a third of its cost): change both together."""
        if self.kind == "map":
            out.ok.append((key, value))
        elif self.kind == "keep":
            if value:
                out.ok.append((key, item))
                if type(key) is int:
                    out.whole.append(key)
            else:
                out.deltas.append((root_of(key), -1))
                out.filtered += 1
                if type(key) is int:
                    out.whole.append(key)
        else:
            values = cast("list[object]", value)
            if len(values) == 1:  # one output keeps its item's key: nothing to count
                out.ok.append((key, values[0]))
            else:
                out.ok.extend([(child_key(key, i), v) for i, v in enumerate(values)])
                out.deltas.append((root_of(key), len(values) - 1))
                out.filtered += not values
            if type(key) is int:
                out.whole.append(key)

    # -- batches -------------------------------------------------------------

    def process(self, batch: list[Envelope], ctx: WorkerContext) -> Outcome:
        if self.is_async:  # one turn of the worker's event loop for the whole batch
            return cast("Outcome", ctx.run_coroutine(self.aprocess(batch, ctx)))
        if self.options.retries:
            pacer = ctx.pacer
            return self._each(batch, lambda item: retry.call(self._call, item, self.options, pacer))
        if self.kind != "map":
            return self._shape_columns(*_split(batch))
        return self._map_columns(*_split(batch))

    def process_columns(
        self, keys: Sequence[Key], items: Sequence[object], ctx: WorkerContext
    ) -> Outcome:
        if self.is_async:
            return cast("Outcome", ctx.run_coroutine(self.aprocess_columns(keys, items, ctx)))
        if self.options.retries:
            return super().process_columns(keys, items, ctx)
        if self.kind != "map":
            return self._shape_columns(keys, items)
        return self._map_columns(keys, items)

    def _shape_columns(self, keys: Sequence[Key], items: Sequence[object]) -> Outcome:
        """A one-to-many stage or a filter, without retries: ``_each`` and ``_place``
        in one loop."""
        fn, flat = self.fn, self.kind == "flat"
        out = Outcome()
        ok, deltas, whole, failed = out.ok, out.deltas, out.whole, out.failed
        append = ok.append
        filtered = 0
        values: list[object] = []
        kept = False
        for key, item in zip(keys, items, strict=True):
            try:
                value = fn(item)
                if flat:
                    values = list(value)
                else:  # a verdict's truth is part of the call: it may raise (an array's)
                    kept = True if value else False  # noqa: SIM210 - no call to bool()
            except WorkerExit:
                raise
            except BaseException as exc:  # noqa: BLE001 - becomes this item's Failure
                failed.append((key, StageError(self.name, item, exc)))
                continue
            root = key if isinstance(key, int) else None  # the item is its own root
            if flat:
                made = len(values)
                if made == 1:  # one output keeps its item's key (see child_key)
                    append((key, values[0]))
                elif root is not None:
                    for i, v in enumerate(values):  # no comprehension: its frame costs more
                        append(((root, i), v))
                else:
                    ok += [(child_key(key, i), v) for i, v in enumerate(values)]
                if root is not None:
                    whole.append(root)
                if made != 1:
                    deltas.append((root_of(key), made - 1))
                    filtered += not made
            elif kept:
                append((key, item))
                if root is not None:
                    whole.append(root)
            else:
                deltas.append((root_of(key), -1))
                filtered += 1
                if root is not None:
                    whole.append(root)
        out.filtered = filtered
        _find_span(out, len(keys))
        return out

    def _map_columns(self, keys: Sequence[Key], items: Sequence[object]) -> Outcome:
        """The common case: a plain map, no retries.  Outputs in column form until
        (unless) an item fails; from there on item by item."""
        fn = self.fn
        out = Outcome()
        values: list[object] = []
        append = values.append
        try:
            for item in items:
                append(fn(item))
        except WorkerExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - becomes this item's Failure
            done = len(values)
            out.ok = list(zip(keys, values, strict=False))
            out.failed.append((keys[done], StageError(self.name, items[done], exc)))
            self._map_rows(out, zip(keys[done + 1 :], items[done + 1 :], strict=True))
            return out
        out.keys, out.values = keys, values
        return out

    def _map_rows(self, out: Outcome, envelopes: Iterable[Envelope]) -> None:
        fn, ok, failed = self.fn, out.ok, out.failed
        for key, item in envelopes:
            try:
                ok.append((key, fn(item)))
            except WorkerExit:
                raise
            except BaseException as exc:  # noqa: BLE001 - becomes this item's Failure
                failed.append((key, StageError(self.name, item, exc)))

    def _each(self, batch: list[Envelope], call: Callable[[object], Any]) -> Outcome:
        out = Outcome()
        for key, item in batch:
            try:
                value, attempts = call(item)
            except WorkerExit:
                raise
            except BaseException as exc:  # noqa: BLE001 - becomes this item's Failure
                self._failed(out, key, item, exc)
            else:
                out.retries += attempts - 1
                self._place(out, key, item, value)
        _find_span(out, len(batch))
        return out

    def _failed(self, out: Outcome, key: Key, item: object, exc: BaseException) -> None:
        if isinstance(exc, retry.Exhausted):
            out.retries += exc.attempts - 1
            error = StageError(self.name, item, exc.exception, attempts=exc.attempts)
        else:
            error = StageError(self.name, item, exc)
        out.failed.append((key, error))

    async def aprocess_columns(
        self, keys: Sequence[Key], items: Sequence[object], ctx: WorkerContext
    ) -> Outcome:
        if self.kind != "map" or self.options.retries:
            return await self._aeach(keys, items, ctx)
        if self.options.timeout is not None:
            return await self._amap_timed(keys, items, self.options.timeout)
        # The common case, without the retry and timeout wrappers' frames, in
        # column form until (unless) an item fails.
        out = Outcome()
        fn, ok, failed = self.fn, out.ok, out.failed
        values: list[object] = []
        append = values.append
        for i, item in enumerate(items):
            try:
                value = await fn(item)
            except BaseException as exc:  # noqa: BLE001 - this item's Failure (see item_error)
                error = item_error(self.name, item, exc)
                if values:
                    ok.extend(zip(keys, values, strict=False))
                    values = []
                failed.append((keys[i], error))
            else:
                if failed:
                    ok.append((keys[i], value))
                else:
                    append(value)
        if not failed:
            out.keys, out.values = keys, values
        return out

    async def _amap_timed(
        self, keys: Sequence[Key], items: Sequence[object], timeout: float
    ) -> Outcome:
        """A plain map under a timeout, each call with its own deadline.

        One ``asyncio.timeout`` scope and one timer serve the whole batch: the
        timer wakes when the earliest call could be due and, if the call in
        progress began later, sleeps on until that one's deadline; only a call
        past its own deadline is cancelled (``asyncio.timeout`` per call would cost a
        timer and a scope, some 5 µs, per item).
        """
        import asyncio

        loop = asyncio.get_running_loop()
        fn, name = self.fn, self.name
        out = Outcome()
        ok, failed = out.ok, out.failed
        values: list[object] = []
        i, n = 0, len(items)
        while i < n:
            try:
                async with asyncio.timeout(None) as scope:
                    deadlines = _Deadlines(loop, scope, timeout)
                    try:
                        while i < n:
                            deadlines.began = loop.time()
                            item = items[i]
                            try:
                                value = await fn(item)
                            except WorkerExit:
                                raise
                            except BaseException as exc:  # this item's Failure (see below)
                                if isinstance(exc, asyncio.CancelledError) and _cancelled_by_run():
                                    raise  # the run stops, or the scope's deadline passed
                                if values:
                                    ok.extend(zip(keys, values, strict=False))
                                    values = []
                                failed.append((keys[i], StageError(name, item, exc)))
                            else:
                                if failed:
                                    ok.append((keys[i], value))
                                else:
                                    values.append(value)
                            i += 1
                    finally:
                        deadlines.close()
            except TimeoutError as exc:  # the scope's: the call on items[i] ran past its deadline
                if values:
                    ok.extend(zip(keys, values, strict=False))
                    values = []
                error = StageTimeout(name, timeout)
                # The timeout's own traceback is asyncio's frame that raised it, whose
                # variables hold this frame, which holds the failure: a reference
                # cycle.  Where the call was when it was cancelled stays (the cause's).
                error.__cause__ = exc.with_traceback(None)
                failed.append((keys[i], StageError(name, items[i], error)))
                i += 1
        if not failed:
            out.keys, out.values = keys, values
        return out

    async def aprocess(self, batch: list[Envelope], ctx: WorkerContext) -> Outcome:

        if self.kind == "map" and not self.options.retries:
            return await self.aprocess_columns(*_split(batch), ctx)
        return await self._aeach(*_split(batch), ctx)

    async def _aeach(
        self, keys: Sequence[Key], items: Sequence[object], ctx: WorkerContext
    ) -> Outcome:
        """Call by call, with the stage's timeout and retries when it has them (a
        bare ``await`` when it has neither), each result placed by its kind."""
        import asyncio

        wrapped = self.options.retries or self.options.timeout is not None
        out = Outcome()
        for key, item in zip(keys, items, strict=True):
            try:
                if wrapped:
                    value, attempts = await self._acall(item, ctx)
                else:
                    value, attempts = await self._acall_once(item), 1
            except WorkerExit:
                raise
            except BaseException as exc:  # becomes this item's Failure (see below)
                if isinstance(exc, asyncio.CancelledError) and _cancelled_by_run():
                    raise
                self._failed(out, key, item, exc)
            else:
                out.retries += attempts - 1
                self._place(out, key, item, value)
        _find_span(out, len(keys))
        return out


async def until_done(work: Awaitable[object]) -> bool:
    """Await ``work`` until it ends, even if this task is cancelled meanwhile; returns
    whether it was (the caller raises the cancellation once it has recorded what
    ``work`` did).  ``work``'s own exception is raised.  The run's join bounds the
    wait."""
    import asyncio

    task = asyncio.ensure_future(_held(work))
    cancelled = False
    while True:
        try:
            exit_error = await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                cancelled = True
                continue
            raise
        if exit_error is not None:
            raise exit_error
        return cancelled


async def _held(work: Awaitable[object]) -> BaseException | None:
    """``await work``, returning a ``SystemExit`` or ``KeyboardInterrupt`` it raises
    rather than raising it: asyncio lets those two out of a task's step, out of the
    event loop itself, where they would end the run's loop thread instead of
    being the setup's (or teardown's) error."""
    try:
        await work
    except (SystemExit, KeyboardInterrupt) as exc:
        return exc
    return None


def item_error(stage: str, item: object, exc: BaseException) -> StageError:
    """The error of an item whose ``async def`` call raised ``exc``; ``exc`` itself is
    raised again when it is not the item's: a :class:`WorkerExit`, or the
    cancellation of the worker's own task (see :func:`_cancelled_by_run`)."""
    if isinstance(exc, WorkerExit):
        raise exc
    import asyncio

    if isinstance(exc, asyncio.CancelledError) and _cancelled_by_run():
        raise exc
    return StageError(stage, item, exc)


def _cancelled_by_run() -> bool:
    """Whether a ``CancelledError`` means that this worker's own task is being
    cancelled (the run stops, or a timeout cuts the call short), rather than one
    that the stage's function raised or let out of a task of its own: that one
    fails its item like any other exception."""
    import asyncio

    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _find_span(out: Outcome, size: int) -> None:
    """Set ``out.span`` if the ``size`` items of its batch were consecutive roots,
    each whole, and none failed (see :class:`Outcome`)."""
    whole = out.whole
    if len(whole) == size and size and not out.failed:
        first = whole[0]
        if whole == list(range(first, first + size)):
            out.span = range(first, first + size)


class _Deadlines:
    """One timer for a batch of async calls, each with its own deadline.

    The caller sets ``began`` as each call begins.  The timer wakes when the
    call in progress could first be due; if that call began later, it sleeps on
    until that call's own deadline; a call past it is cancelled through the
    ``asyncio.timeout`` scope, which then raises ``TimeoutError``.
    """

    __slots__ = ("_loop", "_scope", "_timeout", "_timer", "began")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, scope: asyncio.Timeout, timeout: float
    ) -> None:
        self._loop = loop
        self._scope = scope
        self._timeout = timeout
        self.began = loop.time()
        self._timer = loop.call_at(self.began + timeout, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        due = self.began + self._timeout
        if due <= now:
            self._scope.reschedule(now)  # cancels the call in progress
        else:
            self._timer = self._loop.call_at(due, self._check)

    def close(self) -> None:
        self._timer.cancel()  # (nothing happens if it has fired)


class SetupFailed(Exception):
    """A stateful stage's ``setup`` raised: the run stops with the original error."""

    def __init__(self, stage: str, error: BaseException) -> None:
        super().__init__(f"the setup of stage {stage!r} failed: {error!r}")
        self.stage = stage
        self.error = error

    def __reduce__(self) -> tuple[object, ...]:
        return (SetupFailed, (self.stage, self.error))


class StatefulKernel(Kernel):
    """Runs a stateful stage: each worker gets its own copy of the stage object.

    The copy is made in the worker (for a process worker: unpickled in that
    process), ``setup()`` runs there before the first item, ``process()`` is
    called for every item, and ``teardown()`` runs when the worker ends --
    also after a failure or a cancellation.  If ``setup()`` raises, every item
    the worker gets fails with :class:`SetupFailed`, which ends the run.
    """

    __slots__ = ("options", "prototype", "shared")

    def __init__(
        self,
        name: str,
        prototype: Any,
        is_async: bool,
        options: StageOptions,
        shared: bool = False,
    ) -> None:
        super().__init__(name, is_async)
        self.prototype = prototype
        self.options = options
        #: One object for the stage's workers in each process (``shared=True``).
        self.shared = shared

    def __reduce__(self) -> tuple[object, ...]:
        prototype: object = self.prototype
        cls = type(prototype)
        main = sys.modules.get("__main__")
        if cls.__module__ == "__main__" and main_script(main) is not None:
            # A class of the main script: pickle the object by reference to its
            # class (the worker re-imports the script), so that the worker's
            # results unpickle as the parent's classes.  See _main_reference.
            try:
                data = pickle.dumps(self.prototype, protocol=5)
            except Exception:  # noqa: BLE001 - not picklable by reference: by value below
                pass
            else:
                return (
                    _stateful_from_bytes,
                    (self.name, data, self.is_async, self.options, self.shared),
                )
        return (
            StatefulKernel,
            (self.name, self.prototype, self.is_async, self.options, self.shared),
        )

    def _fresh(self) -> Any:
        """The worker's own copy of the stage object (a process worker's is its
        unpickled one already: copied again, the same)."""
        import copy

        try:
            return copy.deepcopy(self.prototype)
        except Exception as exc:
            copied = (
                "the stage object is copied for the run"
                if self.shared
                else "each worker gets its own copy of the stage object"
            )
            raise TypeError(
                f"stage {self.name!r}: {copied} (copy.deepcopy), but it cannot be copied "
                f"({type(exc).__name__}: {exc}); create what cannot be copied (locks, open "
                "files, connections, clients) in setup(), not in __init__"
            ) from exc

    def _failed_setup(self, batch: list[Envelope], error: BaseException) -> Outcome:
        failure = SetupFailed(self.name, error)
        return Outcome(failed=[(key, StageError(self.name, item, failure)) for key, item in batch])

    def needs_setup(self, ctx: WorkerContext) -> bool:
        return ctx.state is None and ctx.setup_failure is None

    def prepare(self, ctx: WorkerContext) -> None:
        if not self.needs_setup(ctx):
            return
        scope = ctx.scope if self.shared else None
        if scope is None:
            self._set_up(ctx)
            return
        # The first worker sets the shared object up; the others wait on the lock.
        with scope.lock:
            if scope.failure is not None:
                ctx.setup_failure = scope.failure
                return
            state = scope.state
            if state is None:
                self._set_up(ctx)
                if ctx.state is None:
                    scope.failure = ctx.setup_failure
                    return
                state = ctx.state
            scope.hold(ctx, state)

    def _set_up(self, ctx: WorkerContext) -> None:
        """Build the worker's own object and run its ``setup`` (sets ``ctx.state``, or
        ``ctx.setup_failure``)."""
        try:
            instance = self._fresh()
            result = instance.setup()
            if inspect.isawaitable(result):
                ctx.run_coroutine(cast("Coroutine[Any, Any, object]", result))
        except WorkerExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - ends the run with this error (see process)
            # SystemExit and KeyboardInterrupt too: a setup that cannot work stops the
            # run rather than fail every item (or, in a process, crash every worker).
            ctx.setup_failure = exc
            return
        ctx.state = WorkerState(
            instance, FnKernel(self.name, instance.process, self.is_async, self.options)
        )

    def process(self, batch: list[Envelope], ctx: WorkerContext) -> Outcome:
        self.prepare(ctx)
        if ctx.state is None:
            assert ctx.setup_failure is not None
            return self._failed_setup(batch, ctx.setup_failure)
        return ctx.state.kernel.process(batch, ctx)

    async def aprocess(self, batch: list[Envelope], ctx: WorkerContext) -> Outcome:
        if ctx.state is None:
            scope = ctx.scope if self.shared else None
            if scope is None:
                await self._aset_up(ctx)
            else:
                await self._ashare(ctx, scope)
            if ctx.state is None:
                assert ctx.setup_failure is not None
                return self._failed_setup(batch, ctx.setup_failure)
        return await ctx.state.kernel.aprocess(batch, ctx)

    async def _aset_up(self, ctx: WorkerContext) -> None:
        """:meth:`_set_up` on a task worker: sets ``ctx.state`` or ``ctx.setup_failure``
        (once per worker, as on the other backends)."""
        import asyncio

        if ctx.setup_failure is not None:
            return
        cancelled = False
        try:
            instance = self._fresh()
            result = instance.setup()
            if inspect.isawaitable(result):
                # A run that stops meanwhile lets the setup end: its teardown follows.
                cancelled = await until_done(result)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError) and _cancelled_by_run():
                raise  # the worker is stopping, not the setup failing
            ctx.setup_failure = exc
            return
        ctx.state = WorkerState(
            instance, FnKernel(self.name, instance.process, self.is_async, self.options)
        )
        if cancelled:
            raise asyncio.CancelledError

    async def _ashare(self, ctx: WorkerContext, scope: SharedScope) -> None:
        """:meth:`_aset_up` of the one object the stage's task workers share: the first
        worker sets it up while the others await it (all run on one thread)."""
        import asyncio

        while True:
            if scope.failure is not None:
                ctx.setup_failure = scope.failure
                return
            if scope.state is not None:
                scope.hold(ctx, scope.state)
                return
            if scope.setting_up is None:
                break
            await asyncio.shield(scope.setting_up)  # set up by another worker
        done = scope.setting_up = asyncio.get_running_loop().create_future()
        try:
            await self._aset_up(ctx)
        finally:
            # Published also when this worker is cancelled after the setup ended
            # (its teardown follows); a setup cut short leaves it to the next worker.
            state, ctx.state = ctx.state, None
            if state is not None:
                scope.hold(ctx, state)
            elif ctx.setup_failure is not None:
                scope.failure = ctx.setup_failure
            scope.setting_up = None
            done.set_result(None)


def _stateful_from_bytes(
    name: str,
    data: bytes,
    is_async: bool,
    options: StageOptions,
    shared: bool,
) -> StatefulKernel:
    return StatefulKernel(name, pickle.loads(data), is_async, options, shared)


def ship(obj: object) -> bytes:
    """Pickle ``obj`` (a kernel, or a function at decoration) for a worker process.

    Plain pickle when everything in it is importable by name, which is what
    cloudpickle would do with it too, minus the import of cloudpickle (a good
    part of a short run's start-up); cloudpickle for the rest: lambdas, closures,
    local classes, and anything of the main script, which cloudpickle sends by
    value (or our reducers by reference, see :func:`_main_reference`).  Once the
    program has imported cloudpickle (and may have registered modules to send by
    value) it is always cloudpickle.
    """
    if "cloudpickle" not in sys.modules:
        try:
            data = pickle.dumps(obj, protocol=5)
        except Exception:  # noqa: BLE001 - not importable by name: cloudpickle below
            pass
        else:
            if b"__main__" not in data:
                return data
    import cloudpickle

    return cloudpickle.dumps(obj, protocol=5)


def _main_reference(fn: Callable[..., Any], kernel: Kernel) -> tuple[str, str] | None:
    """Where to find ``kernel``'s stage by name, for a stage defined in the main script.

    A worker process re-imports the main script (as multiprocessing does), so a
    stage defined at its top level is sent by reference: the worker then uses
    the script's own classes, and what it returns unpickles as the parent's
    classes.  Anything else travels by value with cloudpickle.
    """
    main = sys.modules.get("__main__")
    if getattr(fn, "__module__", None) != "__main__" or main_script(main) is None:
        return None
    obj: object = main
    for part in getattr(fn, "__qualname__", "<lambda>").split("."):
        obj = getattr(obj, part, None)
    node: object = getattr(obj, "_node", None)
    if isinstance(node, Node) and node.kernel is kernel:
        return ("__main__", fn.__qualname__)
    return None


def main_script(main: object) -> str | None:
    """The file of the main script, if a worker process can import it again: none
    for ``python -c``, a REPL or a notebook, nor for a script read from standard
    input (its ``__file__`` is ``"<stdin>"``)."""
    path = getattr(main, "__file__", None)
    return path if isinstance(path, str) and os.path.isfile(path) else None


def _kernel_of_stage(module: str, qualname: str) -> Kernel:
    obj: object = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    node = getattr(obj, "_node", None)
    if not isinstance(node, Node):
        raise TypeError(f"{module}.{qualname} is not a typeflow stage in this process")
    return node.kernel


def release_callers(errors: Iterable[StageError]) -> None:
    """Clear the variables of the frames of ``errors``' exceptions that have
    returned: the kernel's, which hold the batch and its outcome, and what
    called them (for an ``async def`` function on a thread, the event loop that
    ran it).  Called once the batch's outcome is made, with its failures.

    The stage function's frame, at the top of the traceback, still refers to
    the frame that called it (Python keeps that link once the call is over),
    and so on up, through the frames that hold the outcome, this failure among
    them: a reference cycle that kept every item of a failed batch alive until
    the garbage collector ran, even after the caller had dropped every result.
    The exceptions it was raised from or during (a timeout's, say) have their
    own tracebacks, through the kernel's frames too.  In a traceback only
    typeflow's frames at its top are cleared (the user's stay, for a
    debugger); above it, every frame that has returned (nothing runs it
    again: only introspection could miss what it held), up to one still
    running (the worker's loop) or one that may still resume (see
    :func:`_cleared`).  The failures of a batch share their callers: each
    frame is looked at once.
    """
    visited: set[int] = set()
    for exc in exception_chain(error.exception for error in errors):
        tb = exc.__traceback__
        if tb is None:
            continue
        caller = tb.tb_frame.f_back
        # Typeflow's frames at the top (a traceback of them alone: see
        # StageError); not the rest, which the user's frames begin (an
        # exception object raised again and again keeps every raise's frames).
        while tb is not None and is_own_frame(frame := tb.tb_frame):
            if id(frame) not in visited:
                visited.add(id(frame))
                _cleared(frame)
            tb = tb.tb_next
        while caller is not None and id(caller) not in visited:
            visited.add(id(caller))
            if not _cleared(caller):
                break
            caller = caller.f_back


def _cleared(frame: FrameType) -> bool:
    """Clear ``frame``'s variables if it has returned; whether it had.

    A generator's or coroutine's frame that may resume is left alone (before
    Python 3.13, clearing a suspended one closes it): a suspended frame is
    linked to no caller, a finished one keeps the link it had when it returned
    (a shared exception's traceback, which another batch's raise has taken
    over, may lead to such a frame).  A running frame refuses to be cleared.
    """
    if frame.f_code.co_flags & _RESUMABLE and frame.f_back is None:
        return False
    try:
        frame.clear()
    except RuntimeError:  # still running
        return False
    return True


#: ``co_flags`` of the code of generators and coroutines.
_RESUMABLE = (
    inspect.CO_GENERATOR
    | inspect.CO_COROUTINE
    | inspect.CO_ITERABLE_COROUTINE
    | inspect.CO_ASYNC_GENERATOR
)


@dataclass(frozen=True, slots=True)
class Node:
    """One stage of a compiled pipeline.

    ``runner`` names the backend that runs it when that is not the one in its
    options (structural stages such as ``batch`` always run on their own
    worker).
    """

    name: str
    options: StageOptions
    kernel: Kernel
    runner: str = ""
