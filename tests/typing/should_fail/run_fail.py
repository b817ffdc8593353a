# ruff: noqa: E501
"""Wrong items into a run, and wrong use of its typed results.

Markers on the comment lines directly above a line are about that line.
"""

from __future__ import annotations

from typeflow import StageError, stage


@stage
def parse(text: str) -> int:
    return int(text)


@stage
def double(n: int) -> int:
    return 2 * n


pipeline = parse | double


def feed_literal() -> None:
    # E[mypy]: List item 0 has incompatible type "int"; expected "str"  [list-item]
    # E[mypy]: List item 1 has incompatible type "int"; expected "str"  [list-item]
    # E[pyright]: Argument of type "list[int]" cannot be assigned to parameter "items" of type "Iterable[str] | AsyncIterable[str]" in function "run"
    for result in pipeline.run([1, 2]):
        print(result)


def feed_variable(numbers: list[int]) -> None:
    # E[mypy]: Argument 1 to "run" of "Stage" has incompatible type "list[int]"; expected "Iterable[str] | AsyncIterable[str]"  [arg-type]
    # E[pyright]: Argument of type "list[int]" cannot be assigned to parameter "items" of type "Iterable[str] | AsyncIterable[str]" in function "run"
    pipeline.run(numbers)


async def feed_async(numbers: list[int]) -> None:
    # E[mypy]: Argument 1 to "arun" of "Stage" has incompatible type "list[int]"; expected "Iterable[str] | AsyncIterable[str]"  [arg-type]
    # E[pyright]: Argument of type "list[int]" cannot be assigned to parameter "items" of type "Iterable[str] | AsyncIterable[str]" in function "arun"
    async for result in pipeline.arun(numbers):
        print(result)


def consume() -> None:
    for result in pipeline.run(["1"]):
        # E[mypy]: Incompatible types in assignment (expression has type "int", variable has type "str")  [assignment]
        # E[pyright]: Type "int" is not assignable to declared type "str"
        text: str = result.unwrap()
        print(text)
        # E[mypy]: Incompatible types in assignment (expression has type "StageError", variable has type "ValueError")  [assignment]
        # E[pyright]: Type "StageError" is not assignable to declared type "ValueError"
        error: ValueError = result.failure()
        print(error)


def error_fields(error: StageError) -> None:
    # E[mypy]: Incompatible types in assignment (expression has type "object", variable has type "str")  [assignment]
    # E[pyright]: Type "object" is not assignable to declared type "str"
    item: str = error.item
    print(item)
