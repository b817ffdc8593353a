"""Composition: ``|`` and ``.then()`` on stages and pipelines, and variance."""

from __future__ import annotations

from typing_extensions import Never, assert_type

from typeflow import FnStage, Pipeline, Stage, stage


@stage
def parse(text: str) -> int:
    return int(text)


@stage
def is_even(n: int) -> bool:
    return n % 2 == 0


@stage
def describe(x: object) -> str:
    return repr(x)


@stage
async def encode(text: str) -> bytes:
    return text.encode()


@stage
def size(data: bytes) -> int:
    return len(data)


@stage
def double(n: int) -> int:
    return 2 * n


# Stage | Stage, Pipeline | Stage, Stage | Pipeline, Pipeline | Pipeline.
head = parse | double
assert_type(head, Pipeline[str, int])
tail = is_even | describe
assert_type(tail, Pipeline[int, str])
assert_type(head | is_even, Pipeline[str, bool])
assert_type(parse | tail, Pipeline[str, str])
assert_type(head | tail, Pipeline[str, str])
assert_type(parse | double | is_even | describe | encode | size, Pipeline[str, int])

# .then() is the same as |.
assert_type(parse.then(double), Pipeline[str, int])
assert_type(head.then(tail), Pipeline[str, str])
assert_type(parse.then(double).then(is_even), Pipeline[str, bool])

# Sync and async stages mix freely.
assert_type(describe | encode | size, Pipeline[object, int])

# Variance: a stage that takes object accepts any upstream ...
assert_type(parse | describe, Pipeline[str, str])
assert_type(encode | describe, Pipeline[str, str])
# ... a stage that produces bool feeds one that takes int ...
assert_type(is_even | double, Pipeline[int, int])
# ... and annotations may widen the output and narrow the input.
wide_out: Stage[int, object] = is_even
narrow_in: Stage[bool, str] = describe
exact: FnStage[int, bool] = is_even
pipeline_wide: Pipeline[str, object] = parse | is_even
pipeline_narrow_in: Stage[bool, int] = describe | encode | size


def widened(out_wide: Stage[int, object], in_narrow: Stage[bool, int]) -> None:
    assert_type(out_wide | describe, Pipeline[int, str])
    assert_type(exact | in_narrow, Pipeline[int, int])
    assert_type(in_narrow | out_wide, Pipeline[bool, object])


widened(is_even, describe | encode | size)
widened(wide_out, pipeline_narrow_in)
assert_type(is_even | narrow_in, Pipeline[int, str])
assert_type(pipeline_wide | describe, Pipeline[str, str])


# A pipeline is a stage, so it can be stored and passed as one.
def build(first: Stage[str, int], rest: Stage[int, str]) -> Stage[str, str]:
    return first | rest


assert_type(build(parse, tail), Stage[str, str])
assert_type(build(head, is_even | describe), Stage[str, str])
assert_type(build(parse, tail) | encode, Pipeline[str, bytes])

# The composed stage list.
assert_type(head.stages, tuple[Stage[Never, object], ...])
assert_type(head.stages[0].name, str)
