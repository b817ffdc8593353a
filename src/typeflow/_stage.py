"""Stages, pipelines and the ``@stage`` decorator: the typed surface.

``Stage[In, Out]`` consumes ``In`` and produces ``Out``.  ``In`` is
contravariant and ``Out`` covariant, so a stage that takes ``object`` accepts
anything and a stage that produces ``bool`` feeds one that takes ``int``.
``a | b`` is an ordinary generic ``__or__``: mypy and pyright check every
composition with no plugin.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import AsyncIterable, Callable, Coroutine, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, cast, final, overload

from typeflow._errors import CompositionError, DefinitionError, short_repr
from typeflow._hints import Hint, check_composable, input_hint, output_hint
from typeflow._options import DEFAULT_BUFFER, Backend, StageOptions
from typeflow._runtime._kernel import FnKernel, Kind, Node, ship

if TYPE_CHECKING:
    from typing_extensions import Never, TypeGuard, TypeIs


if TYPE_CHECKING:
    from typeflow._feed import Feed
    from typeflow._runtime._run import AsyncRun, Run

__all__ = [
    "AsyncFnStage",
    "FnStage",
    "Pipeline",
    "Stage",
    "StageDecorator",
    "function_name",
    "is_async_callable",
    "stage",
]

In = TypeVar("In", contravariant=True)
Out = TypeVar("Out", covariant=True)
A = TypeVar("A")
B = TypeVar("B")
C = TypeVar("C")


class Stage(Generic[In, Out]):
    """A step of a pipeline: it consumes ``In`` items and produces ``Out`` items.

    Stages are made with :func:`stage` and joined with ``|``; a :class:`Pipeline`
    is itself a stage, so pipelines nest.  Any stage can be run on its own.
    """

    __slots__ = ()

    @property
    def name(self) -> str:
        """The stage's name, used in errors and statistics."""
        raise NotImplementedError

    def _nodes(self) -> tuple[Node, ...]:
        raise NotImplementedError

    def _in_hint(self) -> Hint:
        return None

    def _out_hint(self) -> Hint:
        return None

    # -- composition -------------------------------------------------------

    def __or__(self, other: Stage[Out, C], /) -> Pipeline[In, C]:
        """``self | other``: feed what this stage produces into ``other``."""
        if not isinstance(other, Stage):  # pyright: ignore[reportUnnecessaryIsInstance] - untyped callers
            raise CompositionError(
                f"cannot pipe stage {self.name!r} into {short_repr(other)}: the right side "
                "of | must be a stage; decorate the function with @stage (or wrap it: "
                "stage(fn))"
            )
        left, right = self._parts(), other._parts()
        check_composable(left[-1].name, self._out_hint(), right[0].name, other._in_hint())
        return Pipeline(left + right)

    def __ror__(self, other: Never, /) -> Never:
        # Only reached when the left side is not a stage: explain instead of
        # Python's generic "unsupported operand type(s)".  Typed ``Never`` so that
        # type checkers still reject ``function | stage``.
        raise CompositionError(
            f"cannot pipe {short_repr(other)} into stage {self.name!r}: the left side of | "
            "must be a stage too; decorate the function with @stage, or pass data with "
            f"{self.name}.run(items)"
        )

    def then(self, other: Stage[Out, C], /) -> Pipeline[In, C]:
        """The same as ``self | other``.

        As a method call, a type checker's error names the expected input type,
        which can be clearer than the message for an operator.
        """
        return self | other

    def _parts(self) -> tuple[Stage[Any, Any], ...]:
        return (self,)

    # -- fluent shapes: the item type comes from ``self``, so nothing is left for a
    # -- type checker to infer (pyright cannot infer ``self | batch(10)``).

    @overload
    def map(
        self,
        fn: Callable[[Out], Coroutine[Any, Any, C]],
        /,
        *,
        workers: int = 1,
        backend: Backend = "thread",
        name: str | None = None,
    ) -> Pipeline[In, C]: ...
    @overload
    def map(
        self,
        fn: Callable[[Out], C],
        /,
        *,
        workers: int = 1,
        backend: Backend = "thread",
        name: str | None = None,
    ) -> Pipeline[In, C]: ...
    def map(
        self,
        fn: Callable[[Out], Any],
        /,
        *,
        workers: int = 1,
        backend: Backend = "thread",
        name: str | None = None,
    ) -> Pipeline[In, Any]:
        """``self | stage(workers=..., backend=..., name=...)(fn)``: one more stage.

        ``fn`` may be ``async def`` (its result is awaited).  As a method, the type
        of ``fn``'s argument comes from this stage, so a lambda is typed too.

        Example:
            >>> @stage
            ... def parse(text: str) -> int:
            ...     return int(text)
            >>> [r.unwrap() for r in parse.map(lambda n: n * 10).run(["1", "2"])]
            [10, 20]
        """
        options = StageOptions(workers=workers, backend=backend, name=name)
        return self | _make(fn, options)

    @overload
    def keep(self, predicate: Callable[[Out], TypeIs[C]], /) -> Pipeline[In, C]: ...
    @overload
    def keep(self, predicate: Callable[[Out], TypeGuard[C]], /) -> Pipeline[In, C]: ...
    @overload
    def keep(self, predicate: Callable[[Out], object], /) -> Pipeline[In, Out]: ...
    def keep(self, predicate: Callable[[Any], object], /) -> Pipeline[In, Any]:
        """``self | keep(predicate)``, keeping the exact output type (or the narrowed one,
        for a ``TypeIs`` or ``TypeGuard`` predicate).

        Example:
            >>> @stage
            ... def parse(text: str) -> int:
            ...     return int(text)
            >>> [r.unwrap() for r in parse.keep(lambda n: n > 1).run(["1", "2", "3"])]
            [2, 3]
        """
        from typeflow._shapes import keep

        return self | keep(predicate)

    def batch(self, size: int, /, *, timeout: float = 1.0) -> Pipeline[In, list[Out]]:
        """Group outputs into lists of ``size`` (a shorter list after ``timeout`` s).

        Example:
            >>> @stage
            ... def parse(text: str) -> int:
            ...     return int(text)
            >>> [r.unwrap() for r in parse.batch(2).run(["1", "2", "3"])]
            [[1, 2], [3]]
        """
        from typeflow._shapes import BatchStage

        return self | BatchStage[Out](size, timeout)

    def unbatch(self: Stage[In, Iterable[C]]) -> Pipeline[In, C]:
        """Pass on each element of each output (the reverse of :meth:`batch`)."""
        from typeflow._shapes import unbatch

        elements: Stage[Iterable[C], C] = unbatch()
        return self | elements

    # -- running -----------------------------------------------------------

    def run(
        self,
        items: Iterable[In] | AsyncIterable[In],
        *,
        ordered: bool = True,
        fail_fast: bool = False,
        window: int | None = None,
        handle_signals: bool = True,
        grace: float = 10.0,
    ) -> Run[Out]:
        """Run the pipeline over ``items``; iterate the result for one ``Result`` per item.

        Args:
            items: any iterable or async iterable, endless ones included; it is
                read lazily, only as fast as the stages have room.  One ``str``
                or ``bytes`` value is refused (``TypeError``): it would be read
                as one item per character; pass ``[value]``.
            ordered: yield results in input order (the default) or as they
                complete (``False``).
            fail_fast: raise the first failure's :class:`~typeflow.StageError`
                and stop the run, instead of yielding it as a ``Failure``.
            window: at most this many items are in flight at once (taken from
                ``items`` but not yet yielded).  It bounds memory and the
                reorder buffer of an ordered run; when it is full, reading
                ``items`` waits for the oldest item.  Default: twice the room
                of every buffer and worker (at least 1024), plus the 256
                results the caller takes at a time: 1280 or more.
            handle_signals: while the run is iterated in the main thread, the
                first Ctrl-C (SIGINT) or SIGTERM stops reading input and lets
                the items already read finish and be yielded; a second signal,
                or ``grace`` seconds, cancels them.  Then the run raises
                ``KeyboardInterrupt`` (or ``SystemExit(143)`` for SIGTERM).  Set
                False to leave signal handling to the caller.
            grace: how long, in seconds, a signalled run may take to drain.

        Returns:
            A :class:`~typeflow.Run`: an iterator of
            ``Result[Out, StageError]`` that can be closed early (``close()``,
            ``with``, ``break``), which stops every worker.

        Example:
            >>> @stage
            ... def double(x: int) -> int:
            ...     return 2 * x
            >>> [r.unwrap() for r in double.run([1, 2, 3])]
            [2, 4, 6]
        """
        from typeflow._runtime._run import Run, RunCore

        core = RunCore(
            self._nodes(),
            ordered=ordered,
            fail_fast=fail_fast,
            window=window,
            handle_signals=handle_signals,
            grace=grace,
        )
        return Run(core, items)

    def feed(
        self,
        *,
        ordered: bool = True,
        fail_fast: bool = False,
        window: int | None = None,
        capacity: int = DEFAULT_BUFFER,
    ) -> Feed[In, Out]:
        """Open a running pipeline that takes items over time (a continuous feed).

        ``feed.put(item)`` from any thread (``await feed.aput(item)`` from a task),
        iterate the feed for the results, ``feed.close()`` when no more items
        come.  ``capacity`` bounds the items waiting to enter the first stage;
        ``put`` waits while it is full.  See :class:`~typeflow.Feed`.
        """
        from typeflow._feed import Feed

        def start(source: Iterator[Any]) -> Run[Out]:
            return self.run(
                source, ordered=ordered, fail_fast=fail_fast, window=window, handle_signals=False
            )

        return Feed(start, capacity)

    def arun(
        self,
        items: Iterable[In] | AsyncIterable[In],
        *,
        ordered: bool = True,
        fail_fast: bool = False,
        window: int | None = None,
    ) -> AsyncRun[Out]:
        """The async twin of :meth:`run`, for use inside a running event loop.

        ``async for result in pipeline.arun(items)``.  An async iterable is read
        on the caller's event loop.  The options ``ordered``, ``fail_fast`` and
        ``window`` are :meth:`run`'s; signals are left to the event loop
        (``asyncio.run`` turns Ctrl-C into cancelling its task, which closes a
        run the task is waiting on, or one opened with ``async with``).
        """
        from typeflow._runtime._run import AsyncRun, RunCore

        return AsyncRun(
            RunCore(self._nodes(), ordered=ordered, fail_fast=fail_fast, window=window), items
        )


@final
class Pipeline(Stage[In, Out]):
    """Stages joined with ``|``.  A pipeline is a stage, so it composes and runs the same way.

    Example:
        >>> @stage
        ... def parse(text: str) -> int:
        ...     return int(text)
        >>> @stage
        ... def square(n: int) -> int:
        ...     return n * n
        >>> pipeline = parse | square
        >>> pipeline
        Pipeline(parse | square)
        >>> [r.unwrap() for r in pipeline.run(["1", "2", "3"])]
        [1, 4, 9]
    """

    __slots__ = ("_name", "_stages")

    def __init__(self, stages: tuple[Stage[Any, Any], ...]) -> None:
        if not stages:
            raise DefinitionError("a pipeline needs at least one stage")
        self._stages = stages
        self._name = " | ".join(s.name for s in stages)

    @property
    def name(self) -> str:
        return self._name

    @property
    def stages(self) -> tuple[Stage[Never, object], ...]:
        """The stages, first to last (nested pipelines are flattened).

        Each is typed ``Stage[Never, object]``, the type every stage has (what
        one stage takes and makes is lost in a tuple of many): read their
        ``name``, or run the pipeline itself.
        """
        return self._stages

    def __repr__(self) -> str:
        return f"Pipeline({self._name})"

    def __len__(self) -> int:
        return len(self._stages)

    def _parts(self) -> tuple[Stage[Any, Any], ...]:
        return self._stages

    def _nodes(self) -> tuple[Node, ...]:
        return tuple(node for s in self._stages for node in s._nodes())

    def _in_hint(self) -> Hint:
        return self._stages[0]._in_hint()

    def _out_hint(self) -> Hint:
        return self._stages[-1]._out_hint()


class _FnStage(Stage[In, Out]):
    """Shared part of the stages made from one function."""

    __slots__ = ("__dict__", "_fn", "_node", "options")

    # Copied from the function, so that the stage looks like it.
    __name__: str
    __qualname__: str

    def __init__(
        self, fn: Callable[..., Any], options: StageOptions, is_async: bool, kind: Kind = "map"
    ) -> None:
        name = options.name or function_name(fn)
        if options.backend == "task" and not is_async:
            raise DefinitionError(
                f"stage {name!r}: backend='task' runs coroutines on an event loop, but "
                f"{name!r} is a plain function (it would block the loop); make it "
                "'async def', or use backend='thread' for blocking code"
            )
        self._fn = fn
        self.options = options
        self._node = Node(name, options, FnKernel(name, fn, is_async, options, kind))
        # Look like the function (what functools.update_wrapper does for functions).
        for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
            with contextlib.suppress(AttributeError):
                setattr(self, attr, getattr(fn, attr))
        if options.backend == "process":
            _check_shippable(name, fn)

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        """The function the stage was made from (``inspect.unwrap`` follows it)."""
        return self._fn

    @property
    def name(self) -> str:
        return self._node.name

    def __repr__(self) -> str:
        o = self.options
        return f"<stage {self.name!r}: {o.workers} {o.backend} worker(s), buffer {o.buffer}>"

    def _nodes(self) -> tuple[Node, ...]:
        return (self._node,)

    def _in_hint(self) -> Hint:
        return input_hint(self._fn)

    def _out_hint(self) -> Hint:
        return output_hint(self._fn)


@final
class FnStage(_FnStage[In, Out]):
    """A stage made from ``def fn(item: In) -> Out``.  Still callable like ``fn``.

    Example:
        >>> @stage
        ... def shout(word: str) -> str:
        ...     return word.upper() + "!"
        >>> shout("hi")          # a plain call: no runtime, for unit tests
        'HI!'
        >>> [r.unwrap() for r in shout.run(["a", "b"])]
        ['A!', 'B!']
    """

    __slots__ = ()

    def __init__(self, fn: Callable[[In], Out], options: StageOptions | None = None) -> None:
        super().__init__(fn, options or StageOptions(), is_async=False)

    def __call__(self, item: In, /) -> Out:
        return cast("Out", self._fn(item))

    @property
    def __wrapped__(self) -> Callable[[In], Out]:
        """The function the stage was made from, with its types (for unit tests)."""
        return cast("Callable[[In], Out]", self._fn)


@final
class AsyncFnStage(_FnStage[In, Out]):
    """A stage made from ``async def fn(item: In) -> Out``; the awaitable is unwrapped.

    Calling it returns the coroutine, like calling ``fn`` does.
    """

    __slots__ = ()

    def __init__(
        self,
        fn: Callable[[In], Coroutine[Any, Any, Out]],
        options: StageOptions | None = None,
    ) -> None:
        super().__init__(fn, options or StageOptions(), is_async=True)

    def __call__(self, item: In, /) -> Coroutine[Any, Any, Out]:
        return cast("Coroutine[Any, Any, Out]", self._fn(item))

    @property
    def __wrapped__(self) -> Callable[[In], Coroutine[Any, Any, Out]]:
        """The function the stage was made from, with its types (for unit tests)."""
        return cast("Callable[[In], Coroutine[Any, Any, Out]]", self._fn)


def function_name(fn: Callable[..., Any]) -> str:
    """A readable default name: the qualified name, also through functools.partial."""
    inner: object = fn
    while isinstance(inner, functools.partial):
        inner = inner.func  # pyright: ignore[reportUnknownMemberType]
    name = getattr(inner, "__qualname__", None)
    if isinstance(name, str):
        return name
    if callable(inner) and not isinstance(inner, type):  # an object with __call__: its class
        return type(inner).__qualname__
    return short_repr(fn)


def _check_shippable(name: str, fn: Callable[..., Any]) -> None:
    try:
        ship(fn)
    except Exception as exc:
        raise DefinitionError(
            f"stage {name!r} uses backend='process', so its function is sent to worker "
            f"processes with cloudpickle, but it cannot be pickled ({type(exc).__name__}: "
            f"{exc}); create what it captures (locks, open files, connections, clients) "
            "inside the function instead, or use backend='thread'"
        ) from exc


def _make(fn: object, options: StageOptions) -> Stage[Any, Any]:
    if isinstance(fn, Stage):
        raise DefinitionError(f"{fn!r} is already a stage; decorate the plain function once")
    if not callable(fn):
        hint = (
            "; the options are keywords: stage(workers=4), stage(backend='process')"
            if isinstance(fn, int | str)
            else ""
        )
        raise DefinitionError(f"@stage needs a function, not {short_repr(fn)}{hint}")
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise DefinitionError(
            f"@stage got the generator function {getattr(fn, '__qualname__', fn)!r}; a stage "
            "makes one output per input: decorate it with @flat_map for one-to-many"
        )
    check_arity(fn)
    if is_async_callable(fn):
        return AsyncFnStage(cast("Callable[[Any], Coroutine[Any, Any, Any]]", fn), options)
    return FnStage(cast("Callable[[Any], Any]", fn), options)


def is_async_callable(fn: object) -> bool:
    """Whether calling ``fn`` makes a coroutine to await: an ``async def`` function
    (also through ``functools.partial``), or an object whose ``__call__`` is one."""
    if inspect.iscoroutinefunction(fn):
        return True
    if inspect.isroutine(fn) or isinstance(fn, type):
        return False
    return inspect.iscoroutinefunction(inspect.getattr_static(type(fn), "__call__", None))


def check_arity(fn: Callable[..., Any], role: str = "a stage's function") -> None:
    """Refuse a function that cannot be called with one item (``role`` names it)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: trust the caller
        return
    try:
        sig.bind(object())
    except TypeError as exc:
        params = list(sig.parameters)
        fix = (
            "it is a method: make a stage of a bound method (stage(Parser().parse)) "
            "or of a @staticmethod, not of the function in the class body"
            if params[:1] in (["self"], ["cls"])
            else "give it exactly one required positional parameter (use functools.partial "
            "for the others)"
        )
        raise DefinitionError(
            f"{role} is called with one item, but "
            f"{getattr(fn, '__qualname__', fn)!r}{sig} cannot be ({exc}); {fix}"
        ) from None


@final
class StageDecorator:
    """What ``stage(workers=..., backend=...)`` returns: apply it to a function."""

    __slots__ = ("options",)

    def __init__(self, options: StageOptions) -> None:
        self.options = options

    @overload
    def __call__(  # type: ignore[overload-overlap] # async first: a coroutine function is also a Callable[[A], B]
        self, fn: Callable[[A], Coroutine[Any, Any, B]], /
    ) -> AsyncFnStage[A, B]: ...
    @overload
    def __call__(self, fn: Callable[[A], B], /) -> FnStage[A, B]: ...
    def __call__(self, fn: Callable[[Any], Any], /) -> Stage[Any, Any]:
        return _make(fn, self.options)

    def __repr__(self) -> str:
        return f"stage({self.options})"


@final
class AsyncStageDecorator:
    """What ``stage(backend="task", ...)`` returns: it accepts ``async def`` functions only."""

    __slots__ = ("options",)

    def __init__(self, options: StageOptions) -> None:
        self.options = options

    def __call__(self, fn: Callable[[A], Coroutine[Any, Any, B]], /) -> AsyncFnStage[A, B]:
        return cast("AsyncFnStage[A, B]", _make(fn, self.options))

    def __repr__(self) -> str:
        return f"stage({self.options})"


@overload
def stage(  # type: ignore[overload-overlap] # async first: a coroutine function is also a Callable[[A], B]
    fn: Callable[[A], Coroutine[Any, Any, B]],
    /,
    *,
    workers: int = 1,
    backend: Backend = "thread",
    buffer: int = DEFAULT_BUFFER,
    name: str | None = None,
    timeout: float | None = None,
    retries: int = 0,
    retry_on: tuple[type[Exception], ...] = (Exception,),
    backoff: float = 0.1,
    max_backoff: float = 30.0,
    rate: float | None = None,
) -> AsyncFnStage[A, B]: ...
@overload
def stage(
    fn: Callable[[A], B],
    /,
    *,
    workers: int = 1,
    backend: Literal["thread", "process"] = "thread",
    buffer: int = DEFAULT_BUFFER,
    name: str | None = None,
    timeout: float | None = None,
    retries: int = 0,
    retry_on: tuple[type[Exception], ...] = (Exception,),
    backoff: float = 0.1,
    max_backoff: float = 30.0,
    rate: float | None = None,
) -> FnStage[A, B]: ...
@overload
def stage(  # type: ignore[overload-overlap] # pyright: ignore[reportOverlappingOverload] - "task" is the special case of Backend
    *,
    workers: int = 1,
    backend: Literal["task"],
    buffer: int = DEFAULT_BUFFER,
    name: str | None = None,
    timeout: float | None = None,
    retries: int = 0,
    retry_on: tuple[type[Exception], ...] = (Exception,),
    backoff: float = 0.1,
    max_backoff: float = 30.0,
    rate: float | None = None,
) -> AsyncStageDecorator: ...
@overload
def stage(
    *,
    workers: int = 1,
    backend: Backend = "thread",
    buffer: int = DEFAULT_BUFFER,
    name: str | None = None,
    timeout: float | None = None,
    retries: int = 0,
    retry_on: tuple[type[Exception], ...] = (Exception,),
    backoff: float = 0.1,
    max_backoff: float = 30.0,
    rate: float | None = None,
) -> StageDecorator: ...
def stage(
    fn: Callable[[Any], Any] | None = None,
    /,
    *,
    workers: int = 1,
    backend: Backend = "thread",
    buffer: int = DEFAULT_BUFFER,
    name: str | None = None,
    timeout: float | None = None,
    retries: int = 0,
    retry_on: tuple[type[Exception], ...] = (Exception,),
    backoff: float = 0.1,
    max_backoff: float = 30.0,
    rate: float | None = None,
) -> Stage[Any, Any] | StageDecorator | AsyncStageDecorator:
    """Turn a one-argument function into a pipeline stage.

    Use it bare (``@stage``: one thread worker) or with options, as a decorator
    or called on a function (``stage(parse, workers=4)``).  The decorated
    object is still callable like the function, so its logic can be unit-tested
    without the runtime.

    Args:
        fn: the function (bare form).  ``async def`` functions are awaited.
        workers: how many workers run the function at once.
        backend: ``"thread"`` (default), ``"process"`` (CPU-bound work; the
            function is shipped by name, or with cloudpickle when it cannot be
            imported) or ``"task"`` (``async def``
            only: asyncio tasks on the run's event loop).  An ``async def``
            function on a thread or process worker runs on an event loop owned
            by that worker.
        buffer: how many items may wait in front of the stage.
        name: the name in errors and statistics (default: the function's
            qualified name).
        timeout: the most seconds one call may take (None: no limit).  An
            ``async def`` call is cancelled; a process worker is killed and
            replaced; a thread is abandoned and replaced (threads cannot be
            killed).  Either way the item fails with :class:`StageTimeout`.
        retries: how many more times a failed call is tried (default 0).
        retry_on: which exceptions are retried (default: any ``Exception``,
            including :class:`StageTimeout` and :class:`WorkerCrashed`).
        backoff: seconds before the first retry, doubling each time, with
            jitter (tenacity's exponential backoff).
        max_backoff: the longest wait between two tries, in seconds.
        rate: at most this many calls per second across all the stage's
            workers, evenly spaced (None: no limit).

    Raises:
        DefinitionError: an option is out of range, the function does not take
            exactly one positional argument, a plain function is given to
            ``backend="task"``, or a process stage's function cannot be pickled.

    Example:
        >>> @stage(workers=4)
        ... def parse(text: str) -> int:
        ...     return int(text)
        >>> parse("42")
        42
        >>> [r.unwrap() for r in parse.run(["1", "2"])]
        [1, 2]
    """
    options = StageOptions(
        workers=workers,
        backend=backend,
        buffer=buffer,
        name=name,
        timeout=timeout,
        retries=retries,
        retry_on=retry_on,
        backoff=backoff,
        max_backoff=max_backoff,
        rate=rate,
    )
    if fn is None:
        if backend == "task":
            return AsyncStageDecorator(options)
        return StageDecorator(options)
    return _make(fn, options)
