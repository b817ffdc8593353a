"""Sources that are not a plain iterable: a continuous feed, and several merged sources."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast, overload

from typeflow._errors import DefinitionError, StageError, TypeflowError, short_repr
from typeflow._options import check_whole
from typeflow._runtime._channel import Channel, ChannelAborted, ChannelClosed, EndOfChannel
from typeflow._runtime._run import Run

if TYPE_CHECKING:
    from returns.result import Result
    from typing_extensions import Self


__all__ = ["Feed", "FeedClosed", "merge"]

In = TypeVar("In", contravariant=True)
Out = TypeVar("Out", covariant=True)
T = TypeVar("T")
T1 = TypeVar("T1")
T2 = TypeVar("T2")
T3 = TypeVar("T3")

_CHUNK = 256


class FeedClosed(TypeflowError):
    """An item was put into a feed that is closed, or whose run has stopped."""


def _check_capacity(label: str, capacity: object) -> None:
    check_whole(
        label,
        "capacity",
        capacity,
        1,
        "capacity must be a whole number of at least 1 (there is no unbounded setting)",
    )


def _check_put_timeout(timeout: object) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0:
        raise ValueError(
            f"put(timeout={timeout!r}): give seconds as a number of at least 0 "
            "(0: do not wait), or None to wait as long as it takes"
        )


def _check_source(i: int, source: object) -> None:
    """Refuse, when ``merge`` is called, a source it cannot read (nothing is consumed),
    or one string, which would be read as many items (as ``run()`` does)."""
    if isinstance(source, str | bytes | bytearray):
        raise DefinitionError(
            f"merge source {i} is one {type(source).__name__} value, {short_repr(source)}, "
            f"which would be read as {len(source)} items; pass a list of items ([value])"
        )
    if isinstance(source, Iterable) or hasattr(type(source), "__getitem__"):
        return
    shown = short_repr(source)
    if isinstance(source, AsyncIterable):
        raise DefinitionError(
            f"merge source {i} is the async iterable {shown}; merge reads "
            "plain iterables, each in a thread: give async sources to arun() one at a "
            "time, or read them into a feed"
        )
    raise DefinitionError(
        f"merge source {i} is {shown}, which cannot be iterated; pass "
        "iterables (a list, a generator, a run...)"
    )


def _drain(channel: Channel[Any], chunk: int) -> Iterator[Any]:
    """The feed's items for the run's reader, ``chunk`` at a time (taken out of the
    feed's buffer, they wait here: few, so that the buffer's bound holds)."""
    while True:
        try:
            batch = channel.get_many(chunk)
        except (EndOfChannel, ChannelAborted):
            return
        yield from batch


class Feed(Generic[In, Out]):
    """A running pipeline that takes items over time, from any thread.

    Made by :meth:`Stage.feed <typeflow.Stage.feed>`.  :meth:`put` items (it waits
    while the feed's buffer is full), iterate the feed for one ``Result`` per
    item, and :meth:`close` it to say no more items come: the run then drains
    and the iteration ends.  Leaving a ``with`` block closes it.

    Example:
        >>> from typeflow import stage
        >>> @stage
        ... def double(x: int) -> int:
        ...     return 2 * x
        >>> with double.feed() as feed:
        ...     feed.put(1)
        ...     feed.put(2)
        ...     feed.close()
        ...     print([r.unwrap() for r in feed])
        [2, 4]
    """

    def __init__(self, start_run: Callable[[Iterator[Any]], Run[Out]], capacity: int) -> None:
        _check_capacity("feed", capacity)  # before anything starts
        self._channel: Channel[Any] = Channel(capacity)
        self._closed = False
        self._lock = threading.Lock()
        # The run's reader holds at most an eighth of the capacity (and one item).
        run = start_run(_drain(self._channel, max(1, min(_CHUNK, capacity // 8))))
        self._run = run
        run._core.on_shutdown(self._channel.abort)  # pyright: ignore[reportPrivateUsage] - a feed is part of its run
        run.start()

    def put(self, item: In, *, timeout: float | None = None) -> None:
        """Add one item, waiting while the buffer is full (at most ``timeout`` seconds,
        if given).

        The buffer makes room only as the results are read: a thread that puts more
        than the feed holds (about ``capacity`` + ``window`` items) before it reads
        waits for ever.  ``timeout`` turns such a wait into an error.

        Raises:
            FeedClosed: the feed was closed, or its run has stopped.
            TimeoutError: ``timeout`` passed with the buffer still full; the item
                was not put.
        """
        if timeout is not None:
            _check_put_timeout(timeout)
        try:
            self._channel.put_many([item], None if timeout is None else time.monotonic() + timeout)
        except (ChannelClosed, ChannelAborted):
            raise FeedClosed(self._why_closed()) from None
        except TimeoutError:
            raise TimeoutError(
                f"the feed stayed full for {timeout:g} s, so the item was not put; "
                "room is made as its results are read: read them in another thread "
                "than the one that puts"
            ) from None

    async def aput(self, item: In) -> None:
        """The awaitable twin of :meth:`put`."""
        try:
            await self._channel.aput_many([item])
        except (ChannelClosed, ChannelAborted):
            raise FeedClosed(self._why_closed()) from None

    def _why_closed(self) -> str:
        if self._closed:
            return "put into a closed feed; open a new one with pipeline.feed()"
        return "put into a feed whose run has stopped (it was cancelled or failed)"

    def close(self) -> None:
        """No more items: the items already put are processed, then the results end."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._channel.producer_done()

    def cancel(self) -> None:
        """Stop now: drop what is in flight and stop every worker."""
        self._closed = True
        self._run.close()

    @property
    def run(self) -> Run[Out]:
        """The underlying run (for :meth:`Run.statistics <typeflow.Run.statistics>`)."""
        return self._run

    def __iter__(self) -> Iterator[Result[Out, StageError]]:
        return self._run

    def __aiter__(self) -> AsyncIterator[Result[Out, StageError]]:
        """``async for result in feed``: waiting for results never blocks the event loop."""
        return self._run._async_twin()  # pyright: ignore[reportPrivateUsage] - a feed is part of its run

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._leave(failed=exc_type is not None)
        self._run.close()

    def _leave(self, *, failed: bool) -> None:
        """Leaving a ``with`` block: no more items; the caller stops the run."""
        if failed:
            self._closed = True  # a put from now on says "closed"
        else:
            self.close()  # what was put is still processed, until the run is closed

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Like leaving a ``with`` block, with the workers joined off the event loop."""
        import asyncio  # not at import: it costs typeflow's import a third more

        self._leave(failed=exc_type is not None)
        await asyncio.to_thread(self._run.close)


class _Raised:
    """A source's error, put into the merged channel after the items it read before
    it: the stream raises it there.  A private class: no item can be one."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _read(channel: Channel[Any], source: Iterable[Any]) -> None:
    """One source's reader thread.  It holds the channel, not the merged stream, so
    that a stream nobody holds any more is collected, and its readers stop."""
    iterator: Iterator[Any] | None = None
    try:
        iterator = iter(source)
        for item in iterator:
            channel.put_many([item])
    except (ChannelAborted, ChannelClosed):
        pass
    except BaseException as exc:  # noqa: BLE001 - raised to the consumer, in its place
        with contextlib.suppress(ChannelAborted, ChannelClosed):
            channel.put_many([_Raised(exc)])
    finally:
        channel.producer_done()
        # A source stopped early is closed: a run's workers stop, a generator's
        # finally runs (a merged stream owns its sources).
        close = getattr(iterator, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()


class _Merged(Iterator[T]):
    """Items from several sources, each read by its own thread, as they come."""

    def __init__(self, sources: tuple[Iterable[Any], ...], capacity: int) -> None:
        self._channel: Channel[Any] = Channel(capacity, producers=len(sources))
        self._buffer: list[Any] = []
        self._threads = [
            threading.Thread(
                target=_read, args=(self._channel, s), name=f"typeflow:merge:{i}", daemon=True
            )
            for i, s in enumerate(sources)
        ]
        for t in self._threads:
            t.start()

    def __next__(self) -> T:
        while not self._buffer:
            try:
                self._buffer = self._channel.get_many(_CHUNK)
                self._buffer.reverse()
            except (EndOfChannel, ChannelAborted):
                self.close()
                raise StopIteration from None
        item = self._buffer.pop()
        if type(item) is _Raised:  # a source failed: after the items read before it
            self.close()
            raise item.error
        return cast("T", item)

    def close(self) -> None:
        """Stop reading every source (each is closed once its reader is back from it)."""
        self._channel.abort()
        self._buffer = []
        deadline = time.monotonic() + 1.0
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))

    def __del__(self) -> None:
        channel: Channel[Any] | None = getattr(self, "_channel", None)
        if channel is not None:  # None when __init__ failed before making it
            channel.abort()


@overload
def merge(s1: Iterable[T1], s2: Iterable[T2], /, *, capacity: int = ...) -> Iterator[T1 | T2]: ...
@overload
def merge(
    s1: Iterable[T1], s2: Iterable[T2], s3: Iterable[T3], /, *, capacity: int = ...
) -> Iterator[T1 | T2 | T3]: ...
@overload
def merge(*sources: Iterable[T], capacity: int = ...) -> Iterator[T]: ...
def merge(*sources: Iterable[Any], capacity: int = _CHUNK) -> Iterator[Any]:
    """Merge several iterables into one stream, taking items as each source yields them.

    Each source is read by its own thread, so a slow source does not hold the
    others back.  The sources may be runs: ``merge(p1.run(a), p2.run(b))``
    merges the results of two pipelines.  Use the result as a pipeline's input.
    If a source raises, the items it read before come out, then the merged
    stream raises that error (the first, if several fail) and the others stop
    at their next item.  A merged stream that is closed, or that nobody holds
    any more, stops reading and closes its sources (a run's workers stop, a
    generator's ``finally`` runs) as each reader gets back from the source.
    A source that cannot be iterated (an async iterable included), or a
    ``capacity`` below 1, is refused here, with :class:`~typeflow.DefinitionError`.

    Example:
        >>> sorted(merge([1, 2], ["a"]), key=str)
        [1, 2, 'a']
    """
    _check_capacity("merge", capacity)
    for i, source in enumerate(sources):
        _check_source(i, source)
    if not sources:
        return iter(())
    return _Merged(sources, capacity)
