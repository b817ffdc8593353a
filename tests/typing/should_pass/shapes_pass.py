"""Dataflow shapes: one-to-many, filters, batches, stateful stages, feeds, merge, take/consume."""

from __future__ import annotations

import sqlite3
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Generator,
    Iterable,
    Iterator,
)

from returns.result import Result
from typing_extensions import TypeGuard, TypeIs, assert_type

from typeflow import (
    AsyncFlatMapStage,
    AsyncStatefulStage,
    BatchStage,
    Feed,
    FlatMapDecorator,
    FlatMapStage,
    Pipeline,
    Run,
    RunStatistics,
    Stage,
    StageError,
    StatefulStage,
    batch,
    flat_map,
    keep,
    keep_type,
    merge,
    stage,
    unbatch,
)

# -- one-to-many ----------------------------------------------------------------------


@flat_map
def words(line: str) -> Iterator[str]:
    yield from line.split()


@flat_map
def digits(text: str) -> list[int]:
    return [int(c) for c in text if c.isdigit()]


@flat_map
def pairs(n: int) -> tuple[int, ...]:
    return (n, n)


@flat_map
async def chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 4):
        yield data[i : i + 4]


@flat_map(workers=4, backend="process", name="split")
def split_cpu(line: str) -> Iterable[str]:
    return line.split()


@flat_map(workers=8, backend="task")
async def expand(url: str) -> AsyncIterator[str]:
    yield url + "/a"
    yield url + "/b"


# An async generator annotated with the wider AsyncIterable is an async stage too.
@flat_map
async def pages(url: str) -> AsyncIterable[str]:
    for i in range(2):
        yield f"{url}?page={i}"


assert_type(pages, AsyncFlatMapStage[str, str])


@stage
def length(word: str) -> int:
    return len(word)


@stage
def parse(text: str) -> int:
    return int(text)


@stage
def double(n: int) -> int:
    return 2 * n


@stage
async def encode(text: str) -> bytes:
    return text.encode()


# The output type is the element type of what the function returns.
assert_type(words, FlatMapStage[str, str])
assert_type(digits, FlatMapStage[str, int])
assert_type(pairs, FlatMapStage[int, int])
assert_type(chunks, AsyncFlatMapStage[bytes, bytes])
assert_type(split_cpu, FlatMapStage[str, str])
assert_type(expand, AsyncFlatMapStage[str, str])
assert_type(flat_map(workers=2), FlatMapDecorator)
assert_type(flat_map(str.split), FlatMapStage[str, str])

# They compose like any stage, on either side.
assert_type(words | length, Pipeline[str, int])
assert_type(encode | chunks, Pipeline[str, bytes])
assert_type(words | digits | pairs | double, Pipeline[str, int])
flat_as_stage: Stage[str, int] = digits

# Calling one directly is calling the function (for unit tests).
assert_type(words("a b"), Iterable[str])
assert_type(chunks(b"abcdefgh"), AsyncIterator[bytes])


# -- filters --------------------------------------------------------------------------


def is_even(n: int) -> bool:
    return n % 2 == 0


def nonempty(text: str) -> object:  # any truthy value will do
    return text.strip()


async def is_known(url: str) -> bool:
    return url.startswith("https://")


def is_str(x: object) -> TypeIs[str]:
    return isinstance(x, str)


def is_number(x: int | str) -> TypeIs[int]:
    return isinstance(x, int)


# A plain predicate keeps the item type.
assert_type(keep(is_even), Stage[int, int])
assert_type(keep(nonempty, workers=2, name="nonempty"), Stage[str, str])
assert_type(keep(is_known, backend="task", workers=8), Stage[str, str])
assert_type(parse | keep(is_even), Pipeline[str, int])
assert_type(keep(is_even) | double, Pipeline[int, int])

# A TypeIs predicate narrows it.
assert_type(keep(is_str), Stage[object, str])
assert_type(keep(is_number), Stage[int | str, int])
assert_type(keep(is_str) | length, Pipeline[object, int])

# keep_type filters by class.
assert_type(keep_type(int), Stage[object, int])
assert_type(keep_type(str) | words, Pipeline[object, str])

# The fluent form keeps the upstream's output type.
assert_type(parse.keep(is_even), Pipeline[str, int])
assert_type(parse.keep(lambda n: n > 3), Pipeline[str, int])
assert_type(parse.map(lambda n: str(n)), Pipeline[str, str])
assert_type(parse.map(lambda n: n / 2, workers=2, backend="process"), Pipeline[str, float])


# -- batch and unbatch ------------------------------------------------------------------

assert_type(parse.batch(100), Pipeline[str, list[int]])
assert_type(parse.batch(100, timeout=0.5), Pipeline[str, list[int]])
assert_type(words.batch(10), Pipeline[str, list[str]])
assert_type(parse.batch(10).unbatch(), Pipeline[str, int])
assert_type(digits.map(lambda n: [n, n]).unbatch(), Pipeline[str, int])
assert_type(words.batch(2).map(len), Pipeline[str, int])


@stage
def save_rows(rows: list[int]) -> int:
    return len(rows)


@stage
def total(rows: Iterable[int]) -> int:
    return sum(rows)


# A batch feeds a stage that takes a list, or any wider type.
assert_type(parse.batch(50) | save_rows, Pipeline[str, int])
assert_type(parse.batch(50) | total, Pipeline[str, int])

# The free functions need the item type from an annotation (pyright cannot infer it).
rows: Stage[int, list[int]] = batch(10, timeout=2.0)
assert_type(parse | rows | save_rows, Pipeline[str, int])
flatten: Stage[Iterable[int], int] = unbatch()
assert_type(digits.batch(3) | flatten, Pipeline[str, int])
assert_type(BatchStage[int](8), BatchStage[int])
assert_type(BatchStage[int](8).size, int)
assert_type(parse | BatchStage[int](8), Pipeline[str, list[int]])


# -- stateful stages ----------------------------------------------------------------------


class Lookup(StatefulStage[str, int], workers=4, backend="process", name="lookup"):
    def __init__(self, path: str) -> None:
        self.path = path

    def setup(self) -> None:
        self.db = sqlite3.connect(self.path)

    def process(self, key: str, /) -> int:
        row: tuple[int] | None = self.db.execute("SELECT 1 WHERE ? = ?", (key, key)).fetchone()
        return 0 if row is None else row[0]

    def teardown(self) -> None:
        self.db.close()


class Counter(StatefulStage[object, int]):  # no options: one thread worker
    def setup(self) -> None:
        self.seen = 0

    def process(self, item: object, /) -> int:
        self.seen += 1
        return self.seen


class Widening(StatefulStage[str, object], timeout=5.0, retries=2, retry_on=(OSError,)):
    # An override may take more and promise more (Liskov).
    def process(self, item: object, /) -> str:
        return repr(item)


class Fetcher(AsyncStatefulStage[str, bytes], workers=16, backend="task", buffer=64, shared=True):
    async def setup(self) -> None:
        self.session: dict[str, bytes] = {}

    async def process(self, url: str, /) -> bytes:
        return self.session.get(url, url.encode())

    async def teardown(self) -> None:
        self.session.clear()


lookup = Lookup("index.sqlite")
assert_type(lookup, Lookup)
lookup_as_stage: Stage[str, int] = lookup
assert_type(lookup | double, Pipeline[str, int])
assert_type(words | lookup | double, Pipeline[str, int])
assert_type(words | Counter(), Pipeline[str, int])
assert_type(parse | Counter(), Pipeline[str, int])
assert_type(words | Widening(), Pipeline[str, object])
assert_type(Fetcher() | chunks, Pipeline[str, bytes])
assert_type(words | Fetcher(), Pipeline[str, bytes])
assert_type(lookup.run(["a"]), Run[int])
assert_type(lookup.name, str)

# Called directly (after setup), a stateful stage is its process method.
assert_type(lookup("key"), int)


async def call_async_stateful() -> None:
    fetcher = Fetcher()
    await fetcher.setup()
    assert_type(await fetcher("https://example.org"), bytes)
    # The unit-test recipe works for an async stage without a setup of its own too.
    lengths = Lengths()
    await lengths.setup()
    assert_type(await lengths("abc"), int)
    await lengths.teardown()


class Lengths(AsyncStatefulStage[str, int]):
    async def process(self, item: str, /) -> int:
        return len(item)


# -- sinks, limits and statistics ----------------------------------------------------------


@stage
def save(n: int) -> None:
    print(n)


def run_methods() -> None:
    failures = (parse | save).run(["1", "x"]).consume()
    assert_type(failures, list[StageError])
    first = (parse | double).run(["1", "2", "3"]).take(2)
    assert_type(first, list[Result[int, StageError]])
    run = words.run(["a b"]).start()
    assert_type(run, Run[str])
    assert_type(run.statistics(), RunStatistics)
    assert_type(run.statistics().stages[0].filtered, int)
    assert_type((parse | double).run(["1"]).values(), Generator[int, None, None])
    assert_type((parse | double).arun(["1"]).values(), AsyncGenerator[int, None])


# -- feeds ----------------------------------------------------------------------------------


def feeding() -> None:
    pipeline = parse | double
    feed = pipeline.feed()
    assert_type(feed, Feed[str, int])
    feed.put("1")
    feed.close()
    for result in feed:
        assert_type(result, Result[int, StageError])
    assert_type(feed.run, Run[int])
    feed.cancel()

    with words.feed(ordered=False, capacity=16) as lines:
        assert_type(lines, Feed[str, str])
        lines.put("hello world")
        lines.close()
        assert_type(list(lines), list[Result[str, StageError]])

    # Variance: a feed that takes object takes str; one that gives bool gives int.
    wide: Feed[str, object] = keep_type(int).feed()
    wide.put("text")


async def feeding_async() -> None:
    feed = (encode | chunks).feed()
    await feed.aput("text")
    feed.close()
    async for result in feed:
        assert_type(result, Result[bytes, StageError])
    async with (parse | double).feed() as numbers:
        assert_type(numbers, Feed[str, int])
        await numbers.aput("1")
        numbers.close()
        assert_type([r async for r in numbers], list[Result[int, StageError]])


# -- merge ------------------------------------------------------------------------------------


def merging(texts: list[str], numbers: Iterator[int], more: Iterable[bytes]) -> None:
    assert_type(merge(texts, numbers), Iterator[str | int])
    assert_type(merge(texts, numbers, more), Iterator[str | int | bytes])
    assert_type(merge(texts, texts, texts, texts), Iterator[str])
    assert_type(merge(texts, texts, capacity=8), Iterator[str])
    # Runs are iterables: merging two pipelines' results.
    merged_runs = merge(parse.run(texts), words.run(texts))
    assert_type(merged_runs, Iterator[Result[int, StageError] | Result[str, StageError]])
    # A merged stream is a pipeline's input.
    assert_type(keep_type(str).run(merge(texts, numbers)), Run[str])
    assert_type(length.run(merge(texts, ["a"])), Run[int])


# The fluent keep narrows with a TypeIs predicate too.
@stage
def parse_loose(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def is_text(x: int | str) -> TypeIs[str]:
    return isinstance(x, str)


assert_type(parse_loose.keep(is_text), Pipeline[str, str])


def guards_number(x: int | str) -> TypeGuard[int]:
    return isinstance(x, int)


assert_type(parse_loose.keep(guards_number), Pipeline[str, int])
