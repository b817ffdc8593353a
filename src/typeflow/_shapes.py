"""Dataflow shapes beyond one-to-one: one-to-many, filters, batches, stateful stages.

Each shape is an ordinary ``Stage[In, Out]``, so ``|`` composes and type-checks
it like any other stage, and each runs on any backend (``batch`` is structural
and always runs on one thread of its own).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
)
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast, final, overload

from typeflow._backends._batcher import BatchKernel
from typeflow._errors import DefinitionError, short_repr
from typeflow._hints import element_hint, narrowed_hint, not_iterable, output_hint
from typeflow._options import DEFAULT_BUFFER, Backend, StageOptions
from typeflow._runtime._kernel import Node, StatefulKernel

# _FnStage: the shapes' base class, package-internal.
from typeflow._stage import Stage, _FnStage, check_arity, function_name, is_async_callable  # pyright: ignore[reportPrivateUsage] - see above

if TYPE_CHECKING:
    from typing_extensions import TypeGuard, TypeIs


__all__ = [
    "AsyncFlatMapStage",
    "AsyncStatefulStage",
    "BatchStage",
    "FlatMapDecorator",
    "FlatMapStage",
    "IsInstance",
    "StatefulStage",
    "batch",
    "flat_map",
    "keep",
    "keep_type",
    "unbatch",
]

In = TypeVar("In", contravariant=True)
Out = TypeVar("Out", covariant=True)
A = TypeVar("A")
B = TypeVar("B")


# -- one-to-many ----------------------------------------------------------------------


@final
class FlatMapStage(_FnStage[In, Out]):
    """A stage made from ``def fn(item: In) -> Iterable[Out]`` (a generator, a list...).

    Each output goes on separately; in an ordered run the outputs of one input
    keep their order and come before those of the next input.

    Example:
        >>> @flat_map
        ... def words(line: str) -> list[str]:
        ...     return line.split()
        >>> [r.unwrap() for r in words.run(["a b", "", "c"])]
        ['a', 'b', 'c']
    """

    __slots__ = ()

    def __init__(
        self, fn: Callable[[In], Iterable[Out]], options: StageOptions | None = None
    ) -> None:
        super().__init__(fn, options or StageOptions(), is_async=False, kind="flat")

    def __call__(self, item: In, /) -> Iterable[Out]:
        return cast("Iterable[Out]", self._fn(item))

    def _out_hint(self) -> object:
        return element_hint(super()._out_hint())


@final
class AsyncFlatMapStage(_FnStage[In, Out]):
    """A stage made from an async generator ``async def fn(item: In)`` that yields ``Out``."""

    __slots__ = ()

    def __init__(
        self, fn: Callable[[In], AsyncIterator[Out]], options: StageOptions | None = None
    ) -> None:
        super().__init__(fn, options or StageOptions(), is_async=True, kind="flat")

    def __call__(self, item: In, /) -> AsyncIterator[Out]:
        return cast("AsyncIterator[Out]", self._fn(item))

    def _out_hint(self) -> object:
        return element_hint(super()._out_hint())


def _make_flat(fn: object, options: StageOptions) -> Stage[Any, Any]:
    if isinstance(fn, Stage) or not callable(fn):
        raise DefinitionError(f"@flat_map needs a function, not {fn!r}")
    if is_async_callable(fn):
        raise DefinitionError(
            f"@flat_map got the coroutine function {getattr(fn, '__qualname__', fn)!r}; "
            "make it an async generator (yield each output), or a plain function"
        )
    check_arity(fn)
    returned = not_iterable(output_hint(fn))
    if returned is not None:
        raise DefinitionError(
            f"@flat_map needs a function that returns its outputs as an iterable (a list, "
            f"a generator...), but {function_name(fn)!r} is annotated to return {returned}; "
            "return a list (one value: [value]), or make it a one-to-one stage with @stage"
        )
    if inspect.isasyncgenfunction(fn):
        return AsyncFlatMapStage(cast("Callable[[Any], AsyncIterator[Any]]", fn), options)
    return FlatMapStage(cast("Callable[[Any], Iterable[Any]]", fn), options)


@final
class FlatMapDecorator:
    """What ``flat_map(workers=..., backend=...)`` returns: apply it to a function."""

    __slots__ = ("options",)

    def __init__(self, options: StageOptions) -> None:
        self.options = options

    @overload
    def __call__(self, fn: Callable[[A], AsyncIterable[B]], /) -> AsyncFlatMapStage[A, B]: ...
    @overload
    def __call__(self, fn: Callable[[A], Iterable[B]], /) -> FlatMapStage[A, B]: ...
    def __call__(self, fn: Callable[[Any], Any], /) -> Stage[Any, Any]:
        return _make_flat(fn, self.options)


@overload
def flat_map(fn: Callable[[A], AsyncIterable[B]], /) -> AsyncFlatMapStage[A, B]: ...
@overload
def flat_map(fn: Callable[[A], Iterable[B]], /) -> FlatMapStage[A, B]: ...
@overload
def flat_map(
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
) -> FlatMapDecorator: ...
def flat_map(
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
) -> Stage[Any, Any] | FlatMapDecorator:
    """Turn a function that makes several outputs per input into a stage.

    The function returns an iterable (a list, a generator) or is an async
    generator; the stage's output type is the element type.  Options are those
    of :func:`~typeflow.stage`.  A call that fails part way fails its input
    item, and none of its outputs go on.
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
        return FlatMapDecorator(options)
    return _make_flat(fn, options)


# -- filters --------------------------------------------------------------------------


@overload
def keep(
    predicate: Callable[[A], TypeIs[B]],
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
) -> Stage[A, B]: ...
@overload
def keep(
    predicate: Callable[[A], TypeGuard[B]],
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
) -> Stage[A, B]: ...
@overload
def keep(
    predicate: Callable[[A], Coroutine[Any, Any, object]],
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
) -> Stage[A, A]: ...
@overload
def keep(
    predicate: Callable[[A], object],
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
) -> Stage[A, A]: ...
def keep(
    predicate: Callable[[Any], Any],
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
) -> Stage[Any, Any]:
    """A stage that passes on the items for which ``predicate`` is true, and drops the rest.

    A ``TypeIs``/``TypeGuard`` predicate narrows the output type.  Dropped items
    yield no result (they count as ``filtered`` in the statistics).  Options are
    those of :func:`~typeflow.stage`: a predicate that calls a service can have
    a ``timeout``, ``retries`` and a ``rate``.

    Example:
        >>> evens = keep(lambda n: n % 2 == 0, name="evens")
        >>> [r.unwrap() for r in evens.run(range(6))]
        [0, 2, 4]
    """
    check_predicate("keep", predicate, allow_async=True)
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
    return _KeepStage[Any, Any](predicate, options, is_async_callable(predicate))


def check_predicate(kind: str, predicate: object, *, allow_async: bool) -> None:
    """Refuse, where it is written, a predicate that cannot answer true or false per item."""
    if not callable(predicate):
        raise DefinitionError(
            f"{kind} needs a predicate function, not {short_repr(predicate)}; pass a function "
            "that takes one item and returns true or false"
        )
    label = getattr(predicate, "__qualname__", predicate)
    if inspect.isgeneratorfunction(predicate) or inspect.isasyncgenfunction(predicate):
        raise DefinitionError(
            f"{kind} got the generator function {label!r} as its predicate; a predicate "
            "returns true or false for each item: return the answer instead of yielding it"
        )
    if not allow_async and is_async_callable(predicate):
        raise DefinitionError(
            f"{kind} got the coroutine function {label!r} as its predicate; it runs in the "
            "run's own thread and cannot be awaited there: make it a plain (cheap) function"
        )
    check_arity(predicate, f"{kind}'s predicate")


@final
class _KeepStage(_FnStage[In, Out]):
    __slots__ = ()

    def __init__(self, predicate: Callable[[Any], Any], options: StageOptions, is_async: bool):
        super().__init__(predicate, options, is_async=is_async, kind="keep")

    def _out_hint(self) -> object:
        if isinstance(self._fn, IsInstance):  # keep_type(cls): its items are cls's
            return self._fn.cls
        return narrowed_hint(super()._out_hint()) or self._in_hint()  # the items go on


@final
class IsInstance:
    """A picklable ``isinstance`` predicate (what :func:`keep_type` filters with)."""

    __slots__ = ("cls",)

    def __init__(self, cls: type[Any]) -> None:
        self.cls = cls

    def __call__(self, item: object) -> bool:
        return isinstance(item, self.cls)

    def __repr__(self) -> str:
        return f"IsInstance({self.cls.__qualname__})"


def keep_type(cls: type[B], /) -> Stage[object, B]:
    """A stage that passes on the items that are instances of ``cls``.

    Example:
        >>> [r.unwrap() for r in keep_type(int).run([1, "a", 2.5, 3])]
        [1, 3]
    """
    if not isinstance(cls, type):  # pyright: ignore[reportUnnecessaryIsInstance] - untyped callers
        raise DefinitionError(
            f"keep_type needs a class, not {cls!r} (parametrised generics such as list[int] "
            "cannot be checked at run time; use keep() with a predicate)"
        )
    predicate = IsInstance(cls)
    options = StageOptions(name=f"keep_type({cls.__qualname__})")
    return _KeepStage[object, B](predicate, options, is_async=False)


# -- batches --------------------------------------------------------------------------


@final
class BatchStage(Stage[A, list[A]]):
    """Groups items into lists of ``size``, flushing a shorter list after ``timeout`` s.

    A list holds items in the order they reach the batch stage.  With several
    workers upstream that is not always the input order (an ordered run orders
    the lists by their first item); put one worker upstream if a list must hold
    consecutive items.
    """

    __slots__ = ("_node",)

    def __init__(self, size: int, timeout: float = 1.0) -> None:
        _check_batch(size, timeout)
        name = f"batch({size})"
        options = StageOptions(name=name, buffer=max(size, DEFAULT_BUFFER))
        self._node = Node(name, options, BatchKernel(name, size, timeout), runner="batcher")

    @property
    def name(self) -> str:
        return self._node.name

    @property
    def size(self) -> int:
        kernel = self._node.kernel
        assert isinstance(kernel, BatchKernel)
        return kernel.size

    def __repr__(self) -> str:
        return f"<stage {self.name!r}>"

    def _nodes(self) -> tuple[Node, ...]:
        return (self._node,)

    def _out_hint(self) -> object:
        return list


def _check_batch(size: object, timeout: object) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise DefinitionError(f"batch size must be a whole number of at least 1, not {size!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise DefinitionError(
            f"batch timeout must be a number of seconds above 0, not {timeout!r}; a "
            "trickle of items must still be flushed"
        )


def batch(size: int, /, *, timeout: float = 1.0) -> Stage[A, list[A]]:
    """Group items into lists of ``size``; a list is flushed early ``timeout`` s after its
    first item, and at the end of the stream.

    Prefer the method form, ``upstream.batch(size)``: it takes the item type from
    ``upstream``.  Neither checker can infer it for the free function on its own
    (mypy: ``Never``, pyright: ``Unknown``): annotate it,
    ``b: Stage[str, list[str]] = batch(10)``.
    """
    return BatchStage[A](size, timeout)


def unbatch() -> Stage[Iterable[A], A]:
    """The reverse of :func:`batch`: each element of each incoming iterable goes on alone.

    Prefer the method form, ``upstream.unbatch()``.
    """
    return FlatMapStage[Iterable[A], A](_elements, StageOptions(name="unbatch"))


def _elements(items: Iterable[A]) -> Iterator[A]:
    """``iter``, annotated: ``x | unbatch()`` is refused at once when ``x`` makes
    something that is not iterable."""
    return iter(items)


# -- stateful stages --------------------------------------------------------------------


class _StatefulBase(Stage[In, Out], ABC):
    _options: ClassVar[StageOptions] = StageOptions()
    _is_async: ClassVar[bool] = False
    _shared: ClassVar[bool] = False

    def __init_subclass__(
        cls,
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
        shared: bool = False,
    ) -> None:
        super().__init_subclass__()
        cls._options = StageOptions(
            workers=workers,
            backend=backend,
            buffer=buffer,
            name=name or cls.__qualname__,
            timeout=timeout,
            retries=retries,
            retry_on=retry_on,
            backoff=backoff,
            max_backoff=max_backoff,
            rate=rate,
        )
        if backend == "task" and not cls._is_async:
            raise DefinitionError(
                f"stage {cls.__qualname__!r}: backend='task' needs an AsyncStatefulStage "
                "(with 'async def process'); use backend='thread' for blocking code"
            )
        if not isinstance(cast("object", shared), bool):  # untyped callers
            raise DefinitionError(
                f"stage {cls.__qualname__!r}: shared={shared!r} is not allowed; give True "
                "(one object for all the workers) or False (one per worker)"
            )
        if shared and cls._is_async and backend == "thread":
            raise DefinitionError(
                f"stage {cls.__qualname__!r}: shared=True needs backend='task' for an "
                "AsyncStatefulStage: its task workers take turns on one event loop, "
                "while each thread worker runs an event loop of its own, and what one "
                "loop built (a client session) cannot serve another"
            )
        cls._shared = shared

    def setup(self) -> Awaitable[None] | None:
        """Build this worker's state (connections, models, caches).  Runs once per worker,
        inside the worker (in its own process for ``backend="process"``)."""
        return None

    def teardown(self) -> Awaitable[None] | None:
        """Release what :meth:`setup` built.  Runs when the worker ends, also after a
        failure or a cancellation."""
        return None

    @property
    def name(self) -> str:
        return self._options.name or type(self).__qualname__

    @property
    def options(self) -> StageOptions:
        return self._options

    def __repr__(self) -> str:
        o = self._options
        return f"<stage {self.name!r}: {o.workers} {o.backend} worker(s), buffer {o.buffer}>"

    def _nodes(self) -> tuple[Node, ...]:
        kernel = StatefulKernel(self.name, self, self._is_async, self._options, self._shared)
        return (Node(self.name, self._options, kernel),)

    def _in_hint(self) -> object:
        from typeflow._hints import input_hint

        process: Callable[..., Any] = getattr(self, "process")  # noqa: B009 - defined by subclasses
        return input_hint(process)


class StatefulStage(_StatefulBase[In, Out]):
    """A stage whose workers each keep state, built by ``setup`` and released by ``teardown``.

    Subclass it, give options as class keywords, and implement :meth:`process`::

        class Lookup(StatefulStage[str, int], workers=4, backend="process"):
            def __init__(self, path: str) -> None:
                self.path = path                    # configuration: sent to each worker
            def setup(self) -> None:
                self.db = sqlite3.connect(self.path)  # state: built in each worker
            def process(self, key: str, /) -> int:
                return self.db.execute(...).fetchone()[0]
            def teardown(self) -> None:
                self.db.close()

    Each worker gets its own copy of the object; ``setup`` runs in the worker
    before its first item.  If ``setup`` raises, the run stops and raises that
    error.  With the class keyword ``shared=True`` the stage's workers in a
    process share one object instead: ``setup`` runs once, in the first worker
    that needs it, and ``teardown`` once, after the last worker ends (on
    threads, ``process`` is then called from several threads at once).
    """

    @abstractmethod
    def process(self, item: In, /) -> Out:
        """Handle one item with this worker's state."""

    def __call__(self, item: In, /) -> Out:
        """Call :meth:`process` directly (for unit tests; run ``setup()`` first)."""
        return self.process(item)


class AsyncStatefulStage(_StatefulBase[In, Out]):
    """The ``async def process`` twin of :class:`StatefulStage` (for ``backend="task"``)."""

    _is_async: ClassVar[bool] = True

    async def setup(self) -> None:
        """Build this worker's state, awaiting what it needs (a client session...)."""

    @abstractmethod
    async def process(self, item: In, /) -> Out:
        """Handle one item with this worker's state."""

    async def teardown(self) -> None:
        """Release what :meth:`setup` built (``await session.close()``...)."""

    def __call__(self, item: In, /) -> Coroutine[Any, Any, Out]:
        """Call :meth:`process` directly (for unit tests; run ``setup()`` first)."""
        return self.process(item)
