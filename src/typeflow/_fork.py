"""Fork/join and routing: one item into several branches, and their results back into one.

``fork(a, b, ...)`` sends every item to every branch and joins each item's
branch results into a tuple; ``route(predicate, then, otherwise)`` sends each
item to one of two branches and passes on whatever that branch makes.  A branch
is any stage or pipeline, on any backend; its stages run with their own workers
and buffers, inside the same run.

At run time a split node is one worker of its own (see
:mod:`typeflow._backends._split`).

Fork branches must make exactly one output per input (no ``flat_map``,
``keep`` or ``batch`` inside, and a route inside only if its own branches make
one output per input), which is checked when the fork is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

from typeflow._backends._split import SplitKernel
from typeflow._errors import DefinitionError, short_repr
from typeflow._hints import Hint, input_hint, narrowed_hint, narrower, output_hint
from typeflow._options import StageOptions
from typeflow._runtime._kernel import FnKernel, Node, StatefulKernel
from typeflow._shapes import check_predicate
from typeflow._stage import Stage, function_name

if TYPE_CHECKING:
    from typing_extensions import TypeGuard, TypeIs


__all__ = ["SplitStage", "fork", "route"]

A = TypeVar("A")
B = TypeVar("B")
B1 = TypeVar("B1")
B2 = TypeVar("B2")
B3 = TypeVar("B3")
B4 = TypeVar("B4")
B5 = TypeVar("B5")
B6 = TypeVar("B6")
C = TypeVar("C")


class SplitStage(Stage[Any, Any]):
    """A fork or a route (see :func:`fork` and :func:`route`)."""

    __slots__ = ("_in", "_node", "_out")

    def __init__(self, node: Node, in_hint: Hint = None, out_hint: Hint = None) -> None:
        self._node = node
        self._in = in_hint
        self._out = out_hint

    def _in_hint(self) -> Hint:
        return self._in

    def _out_hint(self) -> Hint:
        return self._out

    @property
    def name(self) -> str:
        return self._node.name

    def __repr__(self) -> str:
        return f"<stage {self.name!r}>"

    def _nodes(self) -> tuple[Node, ...]:
        return (self._node,)


def _common_input(kind: str, branches: Sequence[Stage[Any, Any]]) -> Hint:
    """The input every branch accepts (the narrowest of theirs), if it is known;
    :class:`CompositionError` if no item could be accepted by all of them."""
    # A stage's hints are package-internal: what composition checks, not API.
    first = branches[0]
    name, hint = first.name, first._in_hint()  # pyright: ignore[reportPrivateUsage] - see above
    for branch in branches[1:]:
        other = branch._in_hint()  # pyright: ignore[reportPrivateUsage] - see above
        hint = narrower(name, hint, branch.name, other, kind)
        if hint is other:
            name = branch.name
    return hint


def _check_branches(kind: str, branches: Sequence[object]) -> None:
    for i, branch in enumerate(branches):
        if not isinstance(branch, Stage):
            raise DefinitionError(
                f"{kind} branch {i} is {short_repr(branch)}, not a stage or pipeline; "
                "decorate the function with @stage (or wrap it: stage(fn))"
            )


@overload
def fork(b1: Stage[A, B1], b2: Stage[A, B2], /) -> Stage[A, tuple[B1, B2]]: ...
@overload
def fork(
    b1: Stage[A, B1], b2: Stage[A, B2], b3: Stage[A, B3], /
) -> Stage[A, tuple[B1, B2, B3]]: ...
@overload
def fork(
    b1: Stage[A, B1], b2: Stage[A, B2], b3: Stage[A, B3], b4: Stage[A, B4], /
) -> Stage[A, tuple[B1, B2, B3, B4]]: ...
@overload
def fork(
    b1: Stage[A, B1], b2: Stage[A, B2], b3: Stage[A, B3], b4: Stage[A, B4], b5: Stage[A, B5], /
) -> Stage[A, tuple[B1, B2, B3, B4, B5]]: ...
@overload
def fork(
    b1: Stage[A, B1],
    b2: Stage[A, B2],
    b3: Stage[A, B3],
    b4: Stage[A, B4],
    b5: Stage[A, B5],
    b6: Stage[A, B6],
    /,
) -> Stage[A, tuple[B1, B2, B3, B4, B5, B6]]: ...
@overload
def fork(*branches: Stage[A, B]) -> Stage[A, tuple[B, ...]]: ...
def fork(*branches: Stage[Any, Any]) -> Stage[Any, Any]:
    """Send every item to every branch; join each item's results into a tuple.

    Each branch is a stage or a pipeline, on any backend.  If a branch fails on
    an item, that item's result is the branch's ``Failure`` (naming the branch's
    stage).  Branches must make one output per input.

    Example:
        >>> from typeflow import stage
        >>> @stage
        ... def length(word: str) -> int:
        ...     return len(word)
        >>> @stage
        ... def shout(word: str) -> str:
        ...     return word.upper()
        >>> [r.unwrap() for r in fork(length, shout).run(["hi", "abc"])]
        [(2, 'HI'), (3, 'ABC')]
    """
    _check_branches("fork", branches)  # first: fork(fn) is a missing @stage, not a count
    if len(branches) < 2:
        raise DefinitionError(
            f"fork needs at least two branches, not {len(branches)}; for one branch, use "
            "the stage itself"
        )
    compiled = tuple(b._nodes() for b in branches)  # pyright: ignore[reportPrivateUsage] - a branch's nodes run inside the split
    for i, nodes in enumerate(compiled):
        for node in nodes:
            if not _one_to_one(node):
                raise DefinitionError(
                    f"fork branch {i} contains stage {node.name!r}, which does not make exactly "
                    "one output per input; a fork joins one result per branch, so put "
                    "flat_map, keep and batch stages before or after the fork"
                )
    name = "fork(" + ", ".join(b.name for b in branches) + ")"
    node = Node(name, StageOptions(name=name), SplitKernel(name, "fork", compiled), "split")
    return SplitStage(node, _common_input("fork", branches), tuple)


def _one_to_one(node: Node) -> bool:
    """Whether ``node`` makes exactly one output per input: a map, a stateful stage,
    a fork, or a route whose branches all do."""
    kernel = node.kernel
    if isinstance(kernel, SplitKernel):
        return kernel.mode == "fork" or all(
            _one_to_one(inner) for branch in kernel.branches for inner in branch
        )
    return isinstance(kernel, StatefulKernel) or (
        isinstance(kernel, FnKernel) and kernel.kind == "map"
    )


@overload
def route(
    predicate: Callable[[A], TypeIs[B]], then: Stage[B, C], otherwise: Stage[A, C], /
) -> Stage[A, C]: ...
@overload
def route(
    predicate: Callable[[A], TypeGuard[B]], then: Stage[B, C], otherwise: Stage[A, C], /
) -> Stage[A, C]: ...
@overload
def route(
    predicate: Callable[[A], object], then: Stage[A, C], otherwise: Stage[A, C], /
) -> Stage[A, C]: ...
def route(
    predicate: Callable[[Any], object], then: Stage[Any, Any], otherwise: Stage[Any, Any], /
) -> Stage[Any, Any]:
    """Send each item to ``then`` when ``predicate(item)`` is true, else to ``otherwise``.

    Both branches produce the same type (use a union for different ones); their
    results go on in one stream.  The predicate runs in the run's own thread,
    so keep it cheap.  Branches may have any shape (one-to-many, filters...).

    Example:
        >>> from typeflow import stage
        >>> @stage
        ... def half(n: int) -> float:
        ...     return n / 2
        >>> @stage
        ... def triple(n: int) -> float:
        ...     return n * 3.0
        >>> [r.unwrap() for r in route(lambda n: n % 2 == 0, half, triple).run([2, 3])]
        [1.0, 9.0]
    """
    check_predicate("route", predicate, allow_async=False)
    _check_branches("route", (then, otherwise))
    compiled = (then._nodes(), otherwise._nodes())  # pyright: ignore[reportPrivateUsage] - as in fork
    name = f"route({function_name(predicate)}, {then.name}, {otherwise.name})"
    kernel = SplitKernel(name, "route", compiled, predicate)
    # Both branches' outputs go on in one stream: known only when they agree.
    then_out = then._out_hint()  # pyright: ignore[reportPrivateUsage] - package-internal hints
    out_hint = then_out if then_out == otherwise._out_hint() else None  # pyright: ignore[reportPrivateUsage] - the same
    node = Node(name, StageOptions(name=name), kernel, "split")
    return SplitStage(node, _route_input(predicate, then, otherwise), out_hint)


def _route_input(
    predicate: Callable[[Any], object], then: Stage[Any, Any], otherwise: Stage[Any, Any]
) -> Hint:
    """What a route accepts: what both branches accept -- unless the predicate
    narrows (``TypeIs``/``TypeGuard``), when ``then`` gets only the narrowed items
    and the route takes what ``otherwise`` (or the predicate) takes."""
    if narrowed_hint(output_hint(predicate)) is None:
        return _common_input("route", (then, otherwise))
    wide = otherwise._in_hint()  # pyright: ignore[reportPrivateUsage] - as in _common_input
    return wide if wide is not None else input_hint(predicate)
