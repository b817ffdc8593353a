"""A bounded channel shared by threads and asyncio tasks.

Every hand-off inside a run goes through a :class:`Channel`: the feeder puts
input items into the first stage's channel, each stage's workers take from their
own channel and put into the next one, and the caller takes outcomes from the
last.  Threads block; tasks await; either may sit on either end.

* **Bounded.**  ``put_many`` waits while the channel holds ``capacity`` items or
  more, so a fast producer cannot run ahead of a slow consumer.  A batch is
  admitted whole once there is room, so the channel never holds more than
  ``capacity`` plus one batch.  With ``max_bytes`` it is also bounded by size:
  its items are then envelopes ``(key, value)`` (or the bare values of a
  numbered channel), each value is weighed with ``sys.getsizeof`` (which
  counts the data of bytes and NumPy arrays) and puts
  wait while the channel holds ``max_bytes`` or more.  Values under
  ``max_bytes / capacity`` count for nothing: the count bounds what they hold
  to ``max_bytes`` already, and a put of one is then the cheaper for it (the
  channel holds at most twice ``max_bytes``, plus one item).  Numbers are
  not weighed one by one where their type (and an ``int``'s magnitude) tells
  that they count for nothing, nor are ``str``, ``bytes`` and ``tuple``
  values where their length does: ``sys.getsizeof`` cost more than the rest
  of their way through a process stage's channel.  Without ``max_bytes``
  nothing is weighed.
* **Batched.**  ``get_many`` takes every item that is there, up to a limit and a
  fair share for the other consumers, in one lock round trip: items travel in
  batches whenever the consumer is busy, one by one when input trickles in.
* **Numbered.**  A run's first buffer (``numbered=True``) holds the input
  items as they are: an item's key is its position in the input, which is how
  many items were taken before it, so the envelope ``(key, item)`` is made only
  where a consumer asks for one (:meth:`get_many`).  The hot consumers take a
  batch as columns instead (:meth:`get_columns`): a ``range`` of keys and a
  list of items, with no tuple per item at all.
* **Explicit end of stream.**  Producers register up front; when the last one
  calls :meth:`producer_done` the channel is closed and consumers get
  :class:`EndOfChannel` once it is empty.  No value is reserved as a sentinel.
* **Cancellable.**  :meth:`abort` drops the contents and makes every waiting and
  future ``put``/``get`` raise :class:`ChannelAborted`.
* **No polling.**  Waiters sleep on a lock (threads) or a future (tasks) and are
  woken by the operation that changes what they wait for.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from operator import call as _call
from operator import is_, itemgetter
from typing import TYPE_CHECKING, Any, Generic, TypeAlias, TypeVar, cast

if TYPE_CHECKING:
    import asyncio


# Numbers are weighed without ``sys.getsizeof`` on each (about 0.1 µs a value,
# which was a third of the parent's work in a chain of process stages of
# numbers): what they weigh is known from their type, and for an ``int`` from
# its magnitude.  So is a bound on what a ``str``, ``bytes`` or ``tuple`` weighs,
# from its length (a tenth of the time of a process stage of short strings).

#: Types whose values weigh a few bytes each, at most :data:`_FIXED_MAX`.
_FIXED: frozenset[type] = frozenset({float, complex, bool, type(None)})
#: (``sys.maxsize`` where ``sys.getsizeof`` tells nothing, as on PyPy: no shortcut.)
_FIXED_MAX: int = max(sys.getsizeof(v, sys.maxsize) for v in (0.0, 0j, None, False, True))
_NONE: type = type(None)
#: Types whose values weigh by their magnitude.
_INTEGRAL: frozenset[type] = frozenset({int, bool})
#: Ints of more digits than this are weighed one by one: the bound itself is an
#: int of that many digits, kept by every channel with a byte budget.
_INT_DIGITS_MAX: int = 4
#: ``type``, declared to return a ``type`` (for a value typed ``Any``).
_kind_of: Callable[[object], type] = type


class _NoValue:
    """A type no value has (where a type is expected before there is one)."""


def _sized_shapes() -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """``(base, per)`` for ``str``, ``bytes`` and ``tuple``: a value of exactly that
    type weighs at most ``base + per * len(value)`` bytes on CPython (``(0, 0)``
    elsewhere: no shortcut).  ``bytes`` and ``tuple`` weigh exactly that (a
    tuple's items are not counted, as for any container); a ``str`` at most: its
    header, up to 4 bytes per character, and up to 4 more for each of the copies
    CPython may keep beside them (a UTF-8 one; before 3.12 a ``wchar_t`` one),
    each with its terminator.  A test holds the bounds to ``sys.getsizeof``."""
    if sys.implementation.name != "cpython":
        return (0, 0), (0, 0), (0, 0)
    text = (str.__basicsize__ + 4 + 4 + 1, 4 + 4 + 4)
    data = (sys.getsizeof(b""), bytes.__itemsize__)
    items = (sys.getsizeof(()), tuple.__itemsize__)
    return text, data, items


_STR_SHAPE, _BYTES_SHAPE, _TUPLE_SHAPE = _sized_shapes()


def _longest_light(shape: tuple[int, int], small: int) -> int:
    """The longest value of ``shape`` (see :func:`_sized_shapes`) that weighs less
    than ``small`` bytes for sure: -1 if none is known to."""
    base, per = shape
    if not per or small - 1 < base:
        return -1
    return (small - 1 - base) // per


def _int_bound(small: int) -> int:
    """An ``int`` of a smaller magnitude than this weighs less than ``small`` bytes
    (0: none is known to).  CPython's ``int`` weighs ``int.__basicsize__`` and
    ``int.__itemsize__`` for each digit of ``sys.int_info.bits_per_digit`` bits
    (at least one: 0 too); a test holds the bound to ``sys.getsizeof``."""
    if sys.implementation.name != "cpython":
        return 0
    digits = (small - 1 - int.__basicsize__) // int.__itemsize__  # the most that stay under
    digits = min(digits, _INT_DIGITS_MAX)
    return 1 << (sys.int_info.bits_per_digit * digits) if digits > 0 else 0


def _is_fixed(kind: type) -> bool:
    """Whether ``kind`` is one of :data:`_FIXED`, by identity: a type's metaclass
    may make it unhashable, or equal to another."""
    return kind is float or kind is _NONE or kind is bool or kind is complex


def _weight(values: Iterable[object], small: int) -> int:
    """The bytes ``values`` of at least ``small`` bytes hold, roughly:
    ``sys.getsizeof`` of each (NumPy arrays and bytes report their data;
    containers only themselves).  Loops in C: an item of a process stage is
    weighed where it is put, and again where it is taken while anything in its
    channel counts (a batch of numbers, or of short ``str``, ``bytes`` or
    ``tuple`` values, more quickly: see ``Channel._weigh``)."""
    return sum(filter(small.__le__, map(sys.getsizeof, values)))


_value_of: Callable[[Any], object] = itemgetter(-1)
_key_of: Callable[[Any], object] = itemgetter(0)


#: A batch as its keys and its values apart (see :meth:`Channel.get_columns`).
Columns: TypeAlias = tuple[Sequence[Any], Sequence[Any]]
R = TypeVar("R")


def _running_loop() -> asyncio.AbstractEventLoop:
    """The running event loop (asyncio is imported by whoever runs one, not by us)."""
    get_running_loop: Callable[[], asyncio.AbstractEventLoop]
    get_running_loop = sys.modules["asyncio"].get_running_loop
    return get_running_loop()


T = TypeVar("T")

__all__ = ["Channel", "ChannelAborted", "ChannelClosed", "Columns", "EndOfChannel", "Window"]


class EndOfChannel(Exception):
    """The channel is closed and empty: the stream has ended."""


class ChannelAborted(Exception):
    """The run was cancelled; the channel no longer carries anything."""


class ChannelClosed(Exception):
    """A put into a channel whose producers are all done."""


class _Waiter:
    __slots__ = ()

    def wake(self) -> None:
        raise NotImplementedError


class _ThreadWaiter(_Waiter):
    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def wake(self) -> None:
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        # Positional: a keyword argument sends the call through the slow argument parser.
        if timeout is None or timeout > threading.TIMEOUT_MAX:  # inf: for as long as it takes
            return self._lock.acquire(True, -1)
        return self._lock.acquire(True, max(0.0, timeout))


class _TaskWaiter(_Waiter):
    """A task waits.  Made on the thread that runs its loop; ``get_running_loop`` is
    called once per wait (it asks the OS for the process id each time, about as
    long as the rest of a put)."""

    __slots__ = ("_future", "_loop", "_thread")

    def __init__(self) -> None:
        loop = _running_loop()
        self._loop = loop
        self._thread = threading.get_ident()
        self._future: asyncio.Future[None] = loop.create_future()

    def wake(self) -> None:
        if threading.get_ident() == self._thread:  # on the loop's own thread
            self._set()
        else:
            # A closed loop raises RuntimeError: nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._set)

    def _set(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    async def wait(self) -> None:
        await self._future


class Channel(Generic[T]):
    """A bounded multi-producer, multi-consumer channel for threads and tasks.

    Args:
        capacity: how many items the channel holds before ``put_many`` waits.
        producers: how many producers will call :meth:`producer_done`; the
            channel closes when all of them have.
        max_bytes: also wait while the items weigh this much (see above).
        numbered: a run's first buffer (see above): it holds bare items, put by
            one producer with :meth:`pour`, :meth:`put_values` or
            :meth:`aput_values`, and gives them out as envelopes ``(position,
            item)``, positions counted from 0.
        size_of: how much each item counts towards a get's ``limit`` (default:
            1).  The caller's outbox counts the results an entry carries, so
            that the caller takes a few hundred results at a time, however
            they are grouped into entries.  Not with :meth:`put_solo` or
            :meth:`pour` (a get then reads the items while a put may append).
    """

    __slots__ = (
        "_aborted",
        "_bytes_in",
        "_bytes_out",
        "_capacity",
        "_dropped",
        "_fixed_small",
        "_getters",
        "_int_bound",
        "_int_low",
        "_items",
        "_lock",
        "_longest_bytes",
        "_longest_str",
        "_longest_tuple",
        "_low",
        "_max_bytes",
        "_open",
        "_producers",
        "_putters",
        "_size_of",
        "_small",
        "_weighed",
        "numbered",
        "taken",
    )

    def __init__(
        self,
        capacity: int,
        producers: int = 1,
        max_bytes: int | None = None,
        size_of: Callable[[T], int] | None = None,
        *,
        numbered: bool = False,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"channel capacity must be at least 1, not {capacity!r}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"channel max_bytes must be at least 1, not {max_bytes!r}")
        self._capacity = capacity
        #: A numbered channel wakes its waiting feeder at this fill level (see _take).
        self._low = capacity // 2
        self._size_of = size_of
        # Without a byte budget nothing is weighed and the byte test always passes.
        self._max_bytes = sys.maxsize if max_bytes is None else max_bytes
        self._weighed = max_bytes is not None
        #: Values smaller than this count for nothing towards ``max_bytes`` (see above).
        self._small = self._max_bytes // capacity if self._weighed else 0
        #: Numbers known to count for nothing without weighing each (see _weigh).
        self._fixed_small = self._small > _FIXED_MAX
        self._int_bound = _int_bound(self._small)
        self._int_low = -self._int_bound  # negated once here, not for every value
        #: The longest ``str``, ``bytes`` and ``tuple`` known to count for nothing.
        self._longest_str = _longest_light(_STR_SHAPE, self._small)
        self._longest_bytes = _longest_light(_BYTES_SHAPE, self._small)
        self._longest_tuple = _longest_light(_TUPLE_SHAPE, self._small)
        # Bytes put and bytes taken, apart: producers write the one, consumers the
        # other, so that a sole producer needs no lock to count (see put_solo).
        self._bytes_in = 0
        self._bytes_out = 0
        # Bare items in a numbered channel (their envelopes are made on the way
        # out), the T themselves in any other.
        self._items: deque[Any] = deque()
        self._lock = threading.Lock()
        self._producers = producers
        self._aborted = False
        #: Producers remain and the channel is not aborted (one test for pour).
        self._open = producers > 0
        self._getters: deque[_Waiter] = deque()
        self._putters: deque[_Waiter] = deque()
        #: How many items consumers have taken so far.
        self.taken = 0
        #: Items an abort dropped (see :attr:`poured`).
        self._dropped = 0
        #: A run's first buffer: bare items, numbered on the way out, so every
        #: batch taken from it holds consecutive positions.
        self.numbered = numbered

    # -- state ---------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return len(self._items)

    @property
    def poured(self) -> int:
        """How many items have been put so far (counted here rather than by the puts:
        one attribute update less per item of :meth:`pour`)."""
        return self.taken + len(self._items) + self._dropped

    @property
    def closed(self) -> bool:
        """True once every producer is done (items may still be waiting)."""
        return self._producers <= 0

    def producer_done(self) -> None:
        """One producer has put its last item; the last one closes the channel."""
        with self._lock:
            self._producers -= 1
            if self._producers == 0:
                self._open = False
                self._wake_all()

    def abort(self) -> None:
        """Drop every item and fail every present and future put or get."""
        with self._lock:
            self._aborted = True
            self._open = False
            self._dropped += len(self._items)
            self._items.clear()
            self._bytes_out = self._bytes_in
            self._wake_all()

    # -- internals (call with the lock held) ---------------------------------

    def _wake_all(self) -> None:
        while self._getters:
            self._getters.popleft().wake()
        while self._putters:
            self._putters.popleft().wake()

    def _weigh(self, batch: Sequence[Any]) -> int:
        """What ``batch`` weighs by :func:`_weight`; for a batch known to weigh less
        than ``_small`` a value without weighing each: numbers (one pass over their
        types, and for ints over their extremes: about a third of the time), and
        values all of type ``str``, ``bytes`` or ``tuple`` (and over their lengths)."""
        values = batch if self.numbered else list(map(_value_of, batch))
        try:
            kinds = set(map(type, values))
        except Exception:  # noqa: BLE001 - a type whose metaclass makes its hash fail: weigh each
            return _weight(values, self._small)
        # A set of types takes a type whose metaclass makes it equal to a builtin
        # one, and hash like it, for that one.  Such a look-alike of a str, bytes
        # or tuple is caught below, and one of an int that fails to order like an
        # int is weighed; one of a float, complex, bool or None, or of an int that
        # orders like one, would count for nothing (contrived: left, for the cost
        # of a test of every value's type by identity in the commonest batches).
        if kinds <= _FIXED:
            light = self._fixed_small
        elif kinds <= _INTEGRAL:  # (bools count as ints here, 0 and 1, and weigh no more)
            try:
                light = self._int_low < min(values) and max(values) < self._int_bound
            except Exception:  # noqa: BLE001 - such a type, whose order fails: weigh each
                light = False
        elif len(kinds) == 1 and (longest := self._longest(kind := next(iter(kinds)))) >= 0:
            # All of one type whose length tells, that very type (tested by identity
            # before any length is asked for: it may be such a look-alike).
            light = all(map(is_, map(type, values), repeat(kind)))
            light = light and max(map(len, values)) <= longest
        else:
            light = False
        return 0 if light else _weight(values, self._small)

    def _longest(self, kind: type) -> int:
        """The longest value of type ``kind`` known to count for nothing: -1 for a type
        whose length tells nothing (tested by identity: a subclass may weigh more,
        and a type's metaclass may make it equal to another)."""
        if kind is str:
            return self._longest_str
        if kind is bytes:
            return self._longest_bytes
        if kind is tuple:
            return self._longest_tuple
        return -1

    def _weigh_one(self, item: Any) -> int:
        value: Any = item if self.numbered else _value_of(item)
        kind = _kind_of(value)
        if kind is int:
            if self._int_low < value < self._int_bound:
                return 0
        elif kind is str or kind is bytes or kind is tuple:
            if len(value) <= self._longest(kind):
                return 0
        elif self._fixed_small and _is_fixed(kind):
            return 0
        weight = sys.getsizeof(value)
        return weight if weight >= self._small else 0

    def _take(self, limit: int, share: int, least: int = 1) -> list[Any]:
        """Take a batch off the front (as stored: bare items in a numbered channel)."""
        items = self._items
        n = len(items)
        if n > 1:  # (one item waiting, the common case of slow items: take it)
            if self._size_of is not None:
                n = self._count_up_to(limit)
            elif share > 1 and limit > 1:
                # ceil: leave something for the other consumers, but take at least
                # ``least`` (a few items are not worth two hand-offs)
                n = min(max(-(-n // share), min(n, least)), limit)
            else:
                n = min(n, limit)
        # One popleft per item (a C loop), never list() then clear(): a sole
        # producer appends without the lock (see put_solo) and may do so between.
        batch = [items.popleft()] if n == 1 else list(map(_call, repeat(items.popleft, n)))
        self.taken += n
        if self._max_bytes != sys.maxsize:
            if not items:
                # Empty: start afresh (a value may have changed size since it was weighed).
                self._bytes_out = self._bytes_in
            elif self._bytes_in != self._bytes_out:
                self._bytes_out += self._weigh(batch)
            # Else nothing held counts for anything: nor does the batch (not weighed).
        if self._putters and self._has_room() and (not self.numbered or len(items) <= self._low):
            self._putters.popleft().wake()
        if items and self._getters:
            self._getters.popleft().wake()
        return batch

    def _count_up_to(self, limit: int) -> int:
        """How many items from the front add up to ``limit`` by ``size_of`` (at least
        one).  Only for channels whose producers all take the lock."""
        size_of = self._size_of
        assert size_of is not None
        total = n = 0
        for item in self._items:
            total += size_of(item)
            n += 1
            if total >= limit:
                break
        return max(n, 1)

    def _rows(self, batch: list[Any]) -> list[T]:
        """A batch just taken, as the items it stands for (lock held: the envelopes of
        a numbered channel's items are numbered by :attr:`taken`)."""
        if not self.numbered:
            return batch
        end = self.taken
        envelopes: list[Any] = list(zip(range(end - len(batch), end), batch, strict=True))
        return envelopes

    def _columns(self, batch: list[Any]) -> Columns:
        """A batch of envelopes just taken, as its keys and its values apart (lock held)."""
        if self.numbered:
            end = self.taken
            return range(end - len(batch), end), batch
        return tuple(map(_key_of, batch)), list(map(_value_of, batch))

    def _give(self, batch: list[Any], weight: int | None = None) -> None:
        self._items.extend(batch)
        if self._max_bytes != sys.maxsize:
            self._bytes_in += self._weigh(batch) if weight is None else weight
        if self._getters:
            self._getters.popleft().wake()
        if self._putters and self._has_room():
            self._putters.popleft().wake()

    def _has_room(self) -> bool:
        return (
            len(self._items) < self._capacity and self._bytes_in - self._bytes_out < self._max_bytes
        )

    def _check_get(self) -> bool:
        """True when a get can proceed now; raises when it never will."""
        if self._aborted:
            raise ChannelAborted
        if self._items:
            return True
        if self._producers <= 0:
            raise EndOfChannel
        return False

    def _check_put(self) -> bool:
        if self._aborted:
            raise ChannelAborted
        if self._producers <= 0:
            raise ChannelClosed
        return self._has_room()

    def _forget(self, waiters: deque[_Waiter], waiter: _Waiter, is_getter: bool) -> None:
        """A waiter gave up (cancelled, interrupted): pass on a wake-up it may have used."""
        try:
            waiters.remove(waiter)
        except ValueError:  # already woken: hand the wake-up to the next one in line
            if is_getter and self._items and self._getters:
                self._getters.popleft().wake()
            elif not is_getter and self._putters and self._has_room():
                self._putters.popleft().wake()

    # -- blocking API (threads) ----------------------------------------------

    def get_many(
        self, limit: int, share: int = 1, deadline: float | None = None, least: int = 1
    ) -> list[T]:
        """Take between 1 and ``limit`` items, waiting for the first one.

        ``share`` is the number of consumers: when several items wait, take only
        a fair share of them so that the other consumers get work too.
        ``deadline`` (a ``time.monotonic()`` value) bounds the wait.

        Raises:
            EndOfChannel: the channel is closed and empty.
            ChannelAborted: the run was cancelled.
            TimeoutError: the deadline passed with nothing to take.
        """
        return self._get(self._rows, limit, share, deadline, least)

    def get_columns(
        self, limit: int, share: int = 1, deadline: float | None = None, least: int = 1
    ) -> Columns:
        """:meth:`get_many` for a channel of envelopes, as the batch's keys and its
        values apart: from a numbered channel a ``range`` and the items as they
        are (no envelope made at all), from any other two new sequences."""
        with self._lock:  # the common case, inlined: items wait
            if self._items and not self._aborted:
                return self._columns(self._take(limit, share, least))
        return self._get(self._columns, limit, share, deadline, least)

    def _get(
        self,
        shape: Callable[[list[Any]], R],
        limit: int,
        share: int,
        deadline: float | None,
        least: int,
    ) -> R:
        while True:
            with self._lock:
                if self._check_get():
                    return shape(self._take(limit, share, least))
                waiter = _ThreadWaiter()
                self._getters.append(waiter)
                if self._items:  # a put_solo came in meanwhile: it may not have seen us
                    self._getters.pop()
                    return shape(self._take(limit, share, least))
            try:
                timeout = None if deadline is None else deadline - time.monotonic()
                woken = waiter.wait(timeout)
            except BaseException:
                with self._lock:
                    self._forget(self._getters, waiter, True)
                raise
            if not woken:
                with self._lock:
                    self._forget(self._getters, waiter, True)
                    if self._check_get():
                        return shape(self._take(limit, share, least))
                raise TimeoutError

    def put_many(
        self, batch: list[T], deadline: float | None = None, *, weight: int | None = None
    ) -> None:
        """Add a batch, waiting while the channel is full.

        ``deadline`` (a ``time.monotonic()`` value) bounds the wait; ``weight`` is
        the batch's, when the caller has weighed it already.

        Raises:
            ChannelAborted: the run was cancelled.
            TimeoutError: the deadline passed with no room (nothing was added).
        """
        if self.offer(batch, weight=weight):
            return
        while True:
            with self._lock:
                if self._check_put():
                    self._give(batch, weight)
                    return
                waiter = _ThreadWaiter()
                self._putters.append(waiter)
            try:
                woken = waiter.wait(None if deadline is None else deadline - time.monotonic())
            except BaseException:
                with self._lock:
                    self._forget(self._putters, waiter, False)
                raise
            if not woken:
                with self._lock:
                    self._forget(self._putters, waiter, False)
                    if self._check_put():
                        self._give(batch, weight)
                        return
                raise TimeoutError

    def put(self, item: T) -> None:
        """Add one item, waiting while the channel is full (:meth:`put_many` of one).

        Raises:
            ChannelAborted: the run was cancelled.
        """
        self.put_many([item])

    def put_solo(self, item: T) -> None:
        """:meth:`put` for the channel's only producer (a run's feeder): in the common
        case -- there is room -- without taking the lock, a third of the cost.

        Safe because the interpreter runs one bytecode at a time and each deque
        operation is atomic: the item is appended before the waiting consumers are
        looked at, and a consumer registers as waiting before it looks at the items
        once more (see :meth:`get_many`), so one of the two always sees the other.
        Only consumers take items, so the capacity holds with a single producer.

        Raises:
            ChannelClosed: the channel was closed (a drain) before the item got in.
            ChannelAborted: the run was cancelled.
        """
        items = self._items
        if (
            len(items) < self._capacity
            and self._bytes_in - self._bytes_out < self._max_bytes
            and self._open
        ):
            weight = self._weigh_one(item) if self._weighed else 0
            # Counted before it is appended: a consumer that empties the channel
            # in between can then only undercount (for a while), never overcount
            # (an empty channel that looked full would never make room).
            self._bytes_in += weight
            items.append(item)
            if self._getters or not self._open:
                self._after_solo_put(item, weight)
            return
        self.put(item)

    def pour(self, values: Iterable[object], window: Window, chunk: int) -> None:
        """Put each of ``values`` into a numbered channel in turn as :meth:`put_solo`
        does, each once it has a place in ``window`` (taken ``chunk`` places at a
        time): a run's feeder, with put_solo's common case inlined (the call was a
        fifth of the feeder's cost).  :attr:`poured` counts the items put so far.

        Raises:
            ChannelClosed: the channel was closed (a drain).
            ChannelAborted: the run was cancelled.
        """
        assert self.numbered, "pour() puts bare items: for a numbered channel only"
        items, capacity, max_bytes = self._items, self._capacity, self._max_bytes
        getsizeof = sys.getsizeof
        weighed = self._weighed
        room = 0
        value: Any
        # Two loops, with and without a byte budget: the test for it was a tenth
        # of the feeder's cost where there is none.
        # A closed or cancelled channel is noticed after the append (and the item
        # taken back), which a put must look for anyway.
        if weighed:
            small, low, bound = self._small, self._int_low, self._int_bound
            fixed, kind_of, none = self._fixed_small, _kind_of, _NONE
            text, data, items_ = self._longest_str, self._longest_bytes, self._longest_tuple
            heavy: type = _NoValue  # the type of the last value that had to be weighed
            for value in values:
                if not room:
                    room = window.take_up_to(chunk)
                room -= 1
                if len(items) < capacity:
                    # As _weigh_one, inlined: a number, str, bytes or tuple known to count
                    # for nothing is not weighed.
                    kind = kind_of(value)
                    if kind is int:
                        light = low < value < bound
                    elif kind is heavy:  # (a stream of dicts, say: one test, not seven)
                        light = False
                    elif kind is str:
                        light = len(value) <= text
                    elif kind is bytes:
                        light = len(value) <= data
                    elif kind is tuple:
                        light = len(value) <= items_
                    else:
                        light = fixed and (
                            kind is float or kind is none or kind is bool or kind is complex
                        )
                        if not light:
                            heavy = kind
                    weight = 0 if light else getsizeof(value)
                    if weight < small:  # counts for nothing: no byte test either
                        items.append(value)
                        if self._getters or not self._open:
                            self._after_solo_put(value, 0)
                        continue
                    if self._bytes_in - self._bytes_out < max_bytes:
                        self._bytes_in += weight  # as in put_solo: counted, then appended
                        items.append(value)
                        if self._getters or not self._open:
                            self._after_solo_put(value, weight)
                        continue
                self.put_solo(value)  # waits for room
            return
        for value in values:
            if not room:
                room = window.take_up_to(chunk)
            room -= 1
            if len(items) < capacity:
                items.append(value)
                if self._getters or not self._open:
                    self._after_solo_put(value, 0)
            else:
                self.put_solo(value)  # waits for room

    def _after_solo_put(self, item: object, weight: int) -> None:
        with self._lock:
            if self._producers <= 0 or self._aborted:
                # Closed or cancelled while the item went in: take it back unless a
                # consumer already has it (then it is processed like any other).
                items = self._items
                if items and items[-1] is item:
                    items.pop()
                    self._bytes_in -= weight
                    raise ChannelAborted if self._aborted else ChannelClosed
                return
            if self._getters:
                self._getters.popleft().wake()

    def put_chunk(self, batch: list[T]) -> None:
        """:meth:`put_many`, except that a batch weighing more than an eighth of the
        byte budget goes in one item at a time, so that the budget still holds.

        Raises:
            ChannelAborted: the run was cancelled.
        """
        weight = self._weigh(batch) if self._weighed else 0
        if weight > self._max_bytes // 8:
            for item in batch:
                self.put(item)
        else:
            self.put_many(batch, weight=weight)

    def put_values(self, values: list[object]) -> None:
        """:meth:`put_chunk` for a numbered channel: bare items (a feeder's chunk).

        Raises:
            ChannelAborted: the run was cancelled.
        """
        assert self.numbered, "put_values() puts bare items: for a numbered channel only"
        self.put_chunk(cast("list[Any]", values))

    def offer_values(self, values: list[object]) -> bool:
        """Put a feeder's chunk (bare items, a numbered channel) if all of it fits now,
        by count and by bytes (True); else put none of it (False).  Never waits.

        Raises:
            ChannelAborted: the run was cancelled.
            ChannelClosed: every producer is done.
        """
        assert self.numbered, "offer_values() puts bare items: for a numbered channel only"
        with self._lock:
            self._check_put()  # raises if the channel is cancelled or closed
            items = self._items
            if len(items) + len(values) > self._capacity:
                return False
            weight = self._weigh(values) if self._weighed else 0
            if self._bytes_in - self._bytes_out + weight > self._max_bytes:
                return False
            items.extend(values)
            self._bytes_in += weight
            if self._getters:
                self._getters.popleft().wake()
            return True

    def take_columns_nowait(self, limit: int, share: int = 1, least: int = 1) -> Columns:
        """Take up to ``limit`` items (a fair ``share``, at least ``least``) without
        waiting, in the form of :meth:`get_columns` (possibly none)."""
        with self._lock:
            if self._aborted or not self._items:
                return (), []
            return self._columns(self._take(limit, share, least))

    # -- async API (tasks) ---------------------------------------------------

    async def aget_many(self, limit: int, share: int = 1, least: int = 1) -> list[T]:
        """The awaitable twin of :meth:`get_many`."""
        return await self._aget(self._rows, limit, share, least)

    async def aget_columns(self, limit: int, share: int = 1, least: int = 1) -> Columns:
        """The awaitable twin of :meth:`get_columns` (a task that expects items to
        be waiting tries :meth:`take_columns_nowait` first: no coroutine at all)."""
        return await self._aget(self._columns, limit, share, least)

    async def _aget(self, shape: Callable[[list[Any]], R], limit: int, share: int, least: int) -> R:
        while True:
            with self._lock:
                if self._check_get():
                    return shape(self._take(limit, share, least))
                waiter = _TaskWaiter()
                self._getters.append(waiter)
                if self._items:  # a put_solo came in meanwhile: it may not have seen us
                    self._getters.pop()
                    return shape(self._take(limit, share, least))
            try:
                await waiter.wait()
            except BaseException:
                with self._lock:
                    self._forget(self._getters, waiter, True)
                raise

    def offer(self, batch: list[T], *, weight: int | None = None) -> bool:
        """Add a batch if there is room now (True), else leave it (False): the common
        case of :meth:`put_many`, and a task's put without a coroutine.  ``weight``:
        the batch's, when the caller has weighed it already.

        Raises:
            ChannelAborted: the run was cancelled.
            ChannelClosed: every producer is done.
        """
        with self._lock:
            items = self._items
            if (
                len(items) < self._capacity
                and self._bytes_in - self._bytes_out < self._max_bytes
                and self._open
            ):
                items.extend(batch)
                if self._max_bytes != sys.maxsize:
                    self._bytes_in += self._weigh(batch) if weight is None else weight
                if self._getters:
                    self._getters.popleft().wake()
                if self._putters and self._has_room():
                    self._putters.popleft().wake()
                return True
            self._check_put()  # raises if the channel is cancelled or closed
            return False

    async def aput_many(self, batch: list[T]) -> None:
        """The awaitable twin of :meth:`put_many`."""
        while True:
            with self._lock:
                if self._check_put():
                    self._give(batch)
                    return
                waiter = _TaskWaiter()
                self._putters.append(waiter)
            try:
                await waiter.wait()
            except BaseException:
                with self._lock:
                    self._forget(self._putters, waiter, False)
                raise

    async def aput_values(self, values: list[object]) -> None:
        """:meth:`aput_many` for a numbered channel: bare items (an async feeder's)."""
        assert self.numbered, "aput_values() puts bare items: for a numbered channel only"
        await self.aput_many(cast("list[Any]", values))


class Window:
    """A bounded number of places: a run's items in flight, each holding one from
    the moment it is read until its last outcome is handed out.

    Places are taken and given back in bulk, at one lock round trip per call
    whatever their number.  Thread and task waiters as in :class:`Channel`;
    :meth:`abort` fails every present and future wait.
    """

    __slots__ = ("_aborted", "_capacity", "_lock", "_used", "_waiters")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"window capacity must be at least 1, not {capacity!r}")
        self._capacity = capacity
        self._used = 0
        self._aborted = False
        self._lock = threading.Lock()
        self._waiters: deque[_Waiter] = deque()

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        """How many places are taken."""
        return self._used

    def _grab(self, count: int) -> int:
        """Take up to ``count`` free places (lock held); 0 when there is none."""
        if self._aborted:
            raise ChannelAborted
        n = min(count, self._capacity - self._used)
        if n <= 0:
            return 0
        self._used += n
        if self._waiters and self._used < self._capacity:
            self._waiters.popleft().wake()
        return n

    def take_up_to(self, count: int) -> int:
        """Take between 1 and ``count`` places: as many as are free, waiting for the first.

        Raises:
            ChannelAborted: the run was cancelled or drained.
        """
        while True:
            with self._lock:
                n = self._grab(count)
                if n:
                    return n
                waiter = _ThreadWaiter()
                self._waiters.append(waiter)
            try:
                waiter.wait()
            except BaseException:
                with self._lock:
                    self._forget(waiter)
                raise

    async def atake(self) -> None:
        """Take one place, waiting for it (the awaitable :meth:`take_up_to`)."""
        while True:
            with self._lock:
                if self._grab(1):
                    return
                waiter = _TaskWaiter()
                self._waiters.append(waiter)
            try:
                await waiter.wait()
            except BaseException:
                with self._lock:
                    self._forget(waiter)
                raise

    def take_now(self, count: int) -> bool:
        """Take ``count`` places if that many are free now (True), else none (False).

        Raises:
            ChannelAborted: the run was cancelled or drained.
        """
        with self._lock:
            if self._aborted:
                raise ChannelAborted
            if self._capacity - self._used < count:
                return False
            self._used += count
            return True

    def give_back(self, count: int) -> None:
        """``count`` places are free again."""
        with self._lock:
            self._used -= count
            if self._waiters and self._used < self._capacity:
                self._waiters.popleft().wake()

    def abort(self) -> None:
        """Fail every present and future wait."""
        with self._lock:
            self._aborted = True
            while self._waiters:
                self._waiters.popleft().wake()

    def _forget(self, waiter: _Waiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:  # already woken: pass the wake-up on
            if self._waiters and self._used < self._capacity:
                self._waiters.popleft().wake()
