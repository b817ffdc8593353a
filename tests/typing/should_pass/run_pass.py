"""Running: ``run()`` / ``arun()`` and the typed results they yield."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from returns.result import Result
from typing_extensions import assert_type

from typeflow import AsyncRun, Pipeline, Run, StageError, stage


@stage
def parse(text: str) -> int:
    return int(text)


@stage
async def inverse(n: int) -> float:
    return 1 / n


@stage
def save(x: float) -> None:
    print(x)


pipeline = parse | inverse
assert_type(pipeline, Pipeline[str, float])


def numbers() -> Iterator[str]:
    yield "1"
    yield "2"


async def anumbers() -> AsyncIterator[str]:
    yield "1"
    yield "2"


def sync_use() -> None:
    results = pipeline.run(["1", "2", "0"])
    assert_type(results, Run[float])
    for result in results:
        assert_type(result, Result[float, StageError])
        assert_type(result.unwrap(), float)
        assert_type(result.value_or(None), float | None)
        assert_type(result.value_or(0.0), float)
        assert_type(result.map(str), Result[str, StageError])
        assert_type(result.alt(str), Result[float, str])

    # Any iterable: a generator, a tuple, an async iterable; options are keywords.
    assert_type(pipeline.run(numbers()), Run[float])
    assert_type(pipeline.run(("1", "2")), Run[float])
    assert_type(pipeline.run(anumbers()), Run[float])
    assert_type(pipeline.run([], ordered=False, fail_fast=True, window=8), Run[float])

    # A single stage runs on its own; a stage that returns None is a sink.
    assert_type(parse.run(["1"]), Run[int])
    assert_type((pipeline | save).run(["1"]), Run[None])

    # The run is a context manager that yields itself.
    with pipeline.run(numbers()) as run:
        assert_type(run, Run[float])
        first = next(run)
        assert_type(first, Result[float, StageError])
    run.close()

    # Collected into a list, failures stay typed.
    collected = list(pipeline.run(["1", "x"]))
    assert_type(collected, list[Result[float, StageError]])
    failures = [r.failure() for r in collected if not is_success(r)]
    assert_type(failures, list[StageError])


def is_success(result: Result[float, StageError]) -> bool:
    return result.value_or(None) is not None


def stage_error(error: StageError) -> None:
    assert_type(error.stage, str)
    assert_type(error.item, object)
    assert_type(error.exception, BaseException)
    assert_type(error.attempts, int)
    assert_type(str(error), str)
    _as_exception: Exception = error  # a StageError is an Exception


async def async_use() -> None:
    results = pipeline.arun(["1", "2"])
    assert_type(results, AsyncRun[float])
    async for result in results:
        assert_type(result, Result[float, StageError])
    await results.aclose()

    assert_type(pipeline.arun(anumbers()), AsyncRun[float])
    assert_type(pipeline.arun(numbers(), ordered=False), AsyncRun[float])
    async with pipeline.arun(anumbers()) as run:
        assert_type(run, AsyncRun[float])
        first = await anext(run)
        assert_type(first, Result[float, StageError])
    collected = [r async for r in pipeline.arun(["1"])]
    assert_type(collected, list[Result[float, StageError]])
