"""fork joins branch results into a typed tuple; route merges two branches."""

from __future__ import annotations

from typing_extensions import TypeGuard, TypeIs, assert_type

from typeflow import Pipeline, Stage, fork, route, stage


@stage
def length(word: str) -> int:
    return len(word)


@stage
def shout(word: str) -> str:
    return word.upper()


@stage
def describe(x: object) -> str:
    return repr(x)


@stage
def is_long(n: int) -> bool:
    return n > 3


@stage(backend="task")
async def fetch(word: str) -> bytes:
    return word.encode()


assert_type(fork(length, shout), Stage[str, tuple[int, str]])
assert_type(fork(length, shout, describe), Stage[str, tuple[int, str, str]])
assert_type(fork(length, shout, describe, fetch), Stage[str, tuple[int, str, str, bytes]])
assert_type(fork(length | is_long, shout), Stage[str, tuple[bool, str]])
assert_type(
    fork(length, shout, describe, fetch, length, shout),
    Stage[str, tuple[int, str, str, bytes, int, str]],
)

# A fork composes like any stage, on both sides.
pipeline = shout | fork(length, describe)
assert_type(pipeline, Pipeline[str, tuple[int, str]])


@stage
def total(pair: tuple[int, str]) -> int:
    return pair[0] + len(pair[1])


assert_type(fork(length, shout) | total, Pipeline[str, int])


# route: both branches feed the same downstream.
def is_str(x: object) -> TypeIs[str]:
    return isinstance(x, str)


@stage
def parse(text: str) -> int:
    return int(text)


@stage
def from_anything(x: object) -> int:
    return hash(x)


assert_type(route(is_str, parse, from_anything), Stage[object, int])


# A TypeGuard predicate narrows like a TypeIs one.
def guards_str(x: object) -> TypeGuard[str]:
    return isinstance(x, str)


assert_type(route(guards_str, parse, from_anything), Stage[object, int])
assert_type(route(lambda w: len(w) > 3, length, length), Stage[str, int])
