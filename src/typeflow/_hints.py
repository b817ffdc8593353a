"""The run-time twin of the static composition check.

``a | b`` is checked by mypy and pyright.  For code that nobody type-checks,
``|`` also compares the annotations it can read at run time: plain classes and
unions of plain classes.  Anything it cannot decide (type variables, ``Any``,
protocols, literals, parametrised generics' arguments, missing annotations) is
accepted, just as a type checker accepts an unannotated function.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any, Union, get_args, get_origin, get_type_hints

from typeflow._errors import CompositionError

__all__ = [
    "Hint",
    "check_composable",
    "element_hint",
    "input_hint",
    "narrowed_hint",
    "not_iterable",
    "output_hint",
]

#: A run-time annotation object, or None when unknown.
Hint = object

# PEP 484 numeric promotions that static checkers apply implicitly.
_PROMOTIONS: dict[type, tuple[type, ...]] = {float: (int,), complex: (int, float)}


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable forward references: unknown
        return {}


def input_hint(fn: Callable[..., Any]) -> Hint:
    """The annotation of ``fn``'s first parameter, or None."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if not params:
        return None
    return _hints(fn).get(params[0].name)


def output_hint(fn: Callable[..., Any]) -> Hint:
    """The annotation of what ``fn`` returns (awaited for ``async def``), or None."""
    return _hints(fn).get("return")


def element_hint(hint: Hint) -> Hint:
    """The element type of an iterable annotation (``Iterator[str]`` -> ``str``), or None."""
    import collections.abc as abc

    origin = get_origin(hint)
    iterables = (
        abc.Iterable,
        abc.Iterator,
        abc.Generator,
        abc.AsyncIterable,
        abc.AsyncIterator,
        abc.AsyncGenerator,
        abc.Sequence,
        list,
        set,
        frozenset,
    )
    args = get_args(hint)
    if origin in iterables and args:
        return args[0]
    return None


def narrowed_hint(hint: Hint) -> Hint:
    """The type a ``TypeIs[X]``/``TypeGuard[X]`` predicate narrows to, or None."""
    import typing

    import typing_extensions

    guards = {typing.TypeGuard, typing_extensions.TypeGuard, typing_extensions.TypeIs}
    if get_origin(hint) in guards and get_args(hint):
        return get_args(hint)[0]
    return None


def not_iterable(hint: Hint) -> str | None:
    """The annotation, formatted, if it is known and nothing it allows can be iterated
    (``int``, ``float | None``...); else None."""
    classes = _classes(hint)
    if not classes or any(hasattr(c, "__iter__") or hasattr(c, "__aiter__") for c in classes):
        return None
    return _fmt(hint)


def _classes(hint: Hint) -> tuple[type, ...] | None:
    """The classes an annotation allows, or None when that is not known (no
    annotation, ``Any``, a type variable, a protocol...)."""
    if hint is None or hint is Any:
        return None  # Any is a class since Python 3.11: it stands for anything
    if hint is type(None):
        return (type(None),)
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        out: list[type] = []
        for member in get_args(hint):
            cls = _classes(member)
            if cls is None:
                return None
            out.extend(cls)
        return tuple(out)
    if origin is not None:
        return (origin,) if isinstance(origin, type) else None
    if isinstance(hint, type):
        return (hint,)
    return None


def _fmt(hint: Hint) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return repr(hint).replace("typing.", "").replace("collections.abc.", "").replace("~", "")


def _accepts(target: type, produced: type) -> bool:
    try:
        # int's subclasses (bool) are promoted too: a bool is accepted as a float.
        if any(issubclass(produced, p) for p in _PROMOTIONS.get(target, ())):
            return True
        return issubclass(produced, target)
    except TypeError:  # e.g. a protocol that is not runtime-checkable
        return True


def narrower(name_a: str, a: Hint, name_b: str, b: Hint, kind: str) -> Hint:
    """Of two input hints that must both accept the same items (a fork's or a route's
    branches), the narrower one; None when either is unknown.  Raise
    :class:`CompositionError` when no item can be accepted by both."""
    if a is None or b is None:
        return None
    a_classes, b_classes = _classes(a), _classes(b)
    if a_classes is None or b_classes is None:
        return None
    if object in b_classes or all(any(_accepts(t, c) for t in b_classes) for c in a_classes):
        return a
    if object in a_classes or all(any(_accepts(t, c) for t in a_classes) for c in b_classes):
        return b
    if any(_accepts(t, c) or _accepts(c, t) for t in a_classes for c in b_classes):
        return None  # they overlap (int | str and str | bytes): some items fit both
    raise CompositionError(
        f"the {kind} branches {name_a!r} and {name_b!r} take the same items, but "
        f"{name_a!r} accepts {_fmt(a)} and {name_b!r} accepts {_fmt(b)}; give them a "
        "common input type"
    )


def check_composable(left: str, out: Hint, right: str, inp: Hint) -> None:
    """Raise :class:`CompositionError` when ``out`` can never be an ``inp``."""
    outs, ins = _classes(out), _classes(inp)
    if outs is None or ins is None or object in ins:
        return
    bad = [o for o in outs if not any(_accepts(i, o) for i in ins)]
    if bad:
        raise CompositionError(
            f"cannot pipe stage {left!r} into stage {right!r}: {left!r} produces "
            f"{_fmt(out)} but {right!r} accepts {_fmt(inp)}; put a stage that converts "
            f"{_fmt(out)} to {_fmt(inp)} between them"
        )
