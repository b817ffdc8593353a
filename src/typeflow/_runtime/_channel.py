"""A bounded channel shared by threads and asyncio tasks.

Every hand-off inside a run goes through a :class:`Channel`: the feeder puts
input items into the first stage's channel, each stage's workers take from their
own channel and put into the next one, and the caller takes outcomes from the
last.  Threads block; tasks await; either may sit on either end.

* **Bounded.**  ``put_many`` waits while the channel holds ``capacity`` items or
  more, so a fast producer cannot run ahead of a slow consumer.  A batch is
  admitted whole once there is room, so the channel never holds more than
  ``capacity`` plus one batch.
* **Batched.**  ``get_many`` takes every item that is there, up to a limit and a
  fair share for the other consumers, in one lock round trip: items travel in
  batches whenever the consumer is busy, one by one when input trickles in.
* **Explicit end of stream.**  Producers register up front; when the last one
  calls :meth:`producer_done` the channel is closed and consumers get
  :class:`EndOfChannel` once it is empty.  No value is reserved as a sentinel.
* **Cancellable.**  :meth:`abort` drops the contents and makes every waiting and
  future ``put``/``get`` raise :class:`ChannelAborted`.
* **No polling.**  Waiters sleep on a lock (threads) or a future (tasks) and are
  woken by the operation that changes what they wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Iterable
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Channel", "ChannelAborted", "ChannelClosed", "EndOfChannel"]


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

    def wait(self) -> None:
        self._lock.acquire()


class _TaskWaiter(_Waiter):
    __slots__ = ("_future", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._future: asyncio.Future[None] = loop.create_future()

    def wake(self) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
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
    """

    __slots__ = (
        "_aborted",
        "_capacity",
        "_getters",
        "_items",
        "_lock",
        "_producers",
        "_putters",
        "taken",
    )

    def __init__(self, capacity: int, producers: int = 1) -> None:
        if capacity < 1:
            raise ValueError(f"channel capacity must be at least 1, not {capacity!r}")
        self._capacity = capacity
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self._producers = producers
        self._aborted = False
        self._getters: deque[_Waiter] = deque()
        self._putters: deque[_Waiter] = deque()
        #: How many items consumers have taken so far.
        self.taken = 0

    # -- state ---------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        """True once every producer is done (items may still be waiting)."""
        return self._producers <= 0

    def producer_done(self) -> None:
        """One producer has put its last item; the last one closes the channel."""
        with self._lock:
            self._producers -= 1
            if self._producers == 0:
                self._wake_all()

    def abort(self) -> None:
        """Drop every item and fail every present and future put or get."""
        with self._lock:
            self._aborted = True
            self._items.clear()
            self._wake_all()

    # -- internals (call with the lock held) ---------------------------------

    def _wake_all(self) -> None:
        while self._getters:
            self._getters.popleft().wake()
        while self._putters:
            self._putters.popleft().wake()

    def _take(self, limit: int, share: int) -> list[T]:
        items = self._items
        n = len(items)
        if share > 1:
            n = -(-n // share)  # ceil: leave something for the other consumers
        n = min(n, limit)
        if n == len(items):
            batch = list(items)
            items.clear()
        else:
            batch = [items.popleft() for _ in range(n)]
        self.taken += n
        if self._putters and len(items) < self._capacity:
            self._putters.popleft().wake()
        if items and self._getters:
            self._getters.popleft().wake()
        return batch

    def _give(self, batch: Iterable[T]) -> None:
        self._items.extend(batch)
        if self._getters:
            self._getters.popleft().wake()
        if self._putters and len(self._items) < self._capacity:
            self._putters.popleft().wake()

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
        return len(self._items) < self._capacity

    def _forget(self, waiters: deque[_Waiter], waiter: _Waiter, is_getter: bool) -> None:
        """A waiter gave up (cancelled, interrupted): pass on a wake-up it may have used."""
        try:
            waiters.remove(waiter)
        except ValueError:  # already woken: hand the wake-up to the next one in line
            if is_getter and self._items and self._getters:
                self._getters.popleft().wake()
            elif not is_getter and self._putters and len(self._items) < self._capacity:
                self._putters.popleft().wake()

    # -- blocking API (threads) ----------------------------------------------

    def get_many(self, limit: int, share: int = 1) -> list[T]:
        """Take between 1 and ``limit`` items, waiting for the first one.

        ``share`` is the number of consumers: when several items wait, take only
        a fair share of them so that the other consumers get work too.

        Raises:
            EndOfChannel: the channel is closed and empty.
            ChannelAborted: the run was cancelled.
        """
        while True:
            with self._lock:
                if self._check_get():
                    return self._take(limit, share)
                waiter = _ThreadWaiter()
                self._getters.append(waiter)
            try:
                waiter.wait()
            except BaseException:
                with self._lock:
                    self._forget(self._getters, waiter, True)
                raise

    def put_many(self, batch: list[T]) -> None:
        """Add a batch, waiting while the channel is full.

        Raises:
            ChannelAborted: the run was cancelled.
        """
        while True:
            with self._lock:
                if self._check_put():
                    self._give(batch)
                    return
                waiter = _ThreadWaiter()
                self._putters.append(waiter)
            try:
                waiter.wait()
            except BaseException:
                with self._lock:
                    self._forget(self._putters, waiter, False)
                raise

    def take_nowait(self, limit: int) -> list[T]:
        """Take up to ``limit`` items without waiting (possibly none)."""
        with self._lock:
            if self._aborted or not self._items:
                return []
            return self._take(limit, 1)

    # -- async API (tasks) ---------------------------------------------------

    async def aget_many(self, limit: int, share: int = 1) -> list[T]:
        """The awaitable twin of :meth:`get_many`."""
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._check_get():
                    return self._take(limit, share)
                waiter = _TaskWaiter(loop)
                self._getters.append(waiter)
            try:
                await waiter.wait()
            except BaseException:
                with self._lock:
                    self._forget(self._getters, waiter, True)
                raise

    async def aput_many(self, batch: list[T]) -> None:
        """The awaitable twin of :meth:`put_many`."""
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._check_put():
                    self._give(batch)
                    return
                waiter = _TaskWaiter(loop)
                self._putters.append(waiter)
            try:
                await waiter.wait()
            except BaseException:
                with self._lock:
                    self._forget(self._putters, waiter, False)
                raise
