"""One-to-many, filters, batches, stateful stages, sinks, feeds, merges and limits,
on every backend."""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from returns.result import Failure, Success
from typing_extensions import TypeIs

from tests.conftest import leftovers, on
from typeflow import (
    AsyncStatefulStage,
    Backend,
    CompositionError,
    DefinitionError,
    FeedClosed,
    Pipeline,
    RemoteTraceback,
    Stage,
    StageError,
    StageTimeout,
    StatefulStage,
    batch,
    flat_map,
    fork,
    keep,
    keep_type,
    merge,
    route,
    stage,
)

pytestmark = pytest.mark.timeout(60)


def split_words(line: str) -> list[str]:
    return line.split()


def is_even(n: int) -> bool:
    return n % 2 == 0


def negate(n: int) -> int:
    return -n


def plus_one(n: int) -> int:
    return n + 1


def length(word: str) -> int:
    return len(word)


def flat_on(backend: Backend, fn: Callable[[int], list[int]]) -> Stage[int, int]:
    """``fn`` as a flat_map stage on ``backend`` (an async generator on "task")."""
    if backend == "task":

        async def each(n: int) -> AsyncIterator[int]:
            for x in fn(n):
                yield x

        return flat_map(workers=2, backend="task")(each)
    return flat_map(workers=2, backend=backend)(fn)


def filter_on(backend: Backend, predicate: Callable[[int], bool]) -> Stage[int, int]:
    """``keep(predicate)`` with 2 workers on ``backend`` (a thread for "task")."""
    return keep(predicate, workers=2, backend="thread" if backend == "task" else backend)


def words_on(backend: Backend) -> Stage[str, str]:
    if backend == "task":

        @flat_map(workers=2, backend="task")
        async def words(line: str) -> AsyncIterator[str]:
            for word in line.split():
                await asyncio.sleep(0)
                yield word

        return words
    return flat_map(workers=2, backend=backend)(split_words)


LINES = ["the quick brown fox", "", "jumps", "over the lazy dog", "", ""]
WORDS = [w for line in LINES for w in line.split()]


# -- one-to-many ----------------------------------------------------------------------


def test_flat_map_keeps_order_within_and_across_items(backend: Backend) -> None:
    pipeline = words_on(backend) | on(backend, length)
    assert [r.unwrap() for r in pipeline.run(LINES * 20)] == [len(w) for w in WORDS * 20]


def test_flat_map_unordered_yields_every_output(backend: Backend) -> None:
    got = [r.unwrap() for r in words_on(backend).run(LINES * 20, ordered=False)]
    assert Counter(got) == Counter(WORDS * 20)


def explode(line: str) -> Iterator[str]:
    yield "partial"
    if line == "bad":
        raise ValueError("bad line")
    yield line


async def aexplode(line: str) -> AsyncIterator[str]:
    for word in explode(line):
        yield word


def test_a_failing_flat_map_call_fails_its_item_only(backend: Backend) -> None:
    if backend == "task":
        exploding: Stage[str, str] = flat_map(backend="task")(aexplode)
    else:
        exploding = flat_map(backend=backend)(explode)
    results = list(exploding.run(["a", "bad", "b"]))
    assert [r.unwrap() for r in results if isinstance(r, Success)] == [
        "partial",
        "a",
        "partial",
        "b",
    ]
    (failure,) = [r.failure() for r in results if isinstance(r, Failure)]
    assert failure.item == "bad"
    assert isinstance(failure.exception, ValueError)


def test_flat_map_statistics(backend: Backend) -> None:
    run = words_on(backend).run(LINES)
    assert len(list(run)) == len(WORDS)
    stats = run.statistics()
    assert stats.items_read == len(LINES)
    assert stats.done == len(LINES)
    assert stats.in_flight == 0
    assert stats.stages[0].succeeded == len(WORDS)
    assert stats.stages[0].filtered == LINES.count("")


# -- filters ----------------------------------------------------------------------------


def test_keep_drops_items_and_accounts_for_them(backend: Backend) -> None:
    if backend == "task":

        async def even(n: int) -> bool:
            return n % 2 == 0

        evens: Stage[int, int] = keep(even, backend="task", workers=3)
    else:
        evens = keep(is_even, backend=backend, workers=2)
    run = evens.run(range(100))
    assert [r.unwrap() for r in run] == list(range(0, 100, 2))
    stats = run.statistics()
    assert (stats.done, stats.in_flight, stats.stages[0].filtered) == (100, 0, 50)


def last_of_five(n: int) -> bool:
    return n % 5 == 4


def five_each(n: int) -> list[int]:
    return [5 * n + i for i in range(5)]


@pytest.mark.parametrize("ordered", [True, False])
def test_items_dropped_together_are_each_accounted_for(backend: Backend, ordered: bool) -> None:
    # A batch's drops reach the caller as one entry: consecutive items (9 of
    # every 10), scattered ones, several outputs of one item (4 of the 5 outputs
    # of a flat_map); each input item still ends as exactly one outcome.
    def keep_ends(n: int) -> bool:
        return n % 10 == 9

    cases: list[tuple[Stage[int, int], list[int], int]] = [
        (
            filter_on(backend, keep_ends) | on(backend, plus_one),
            [10 * k + 10 for k in range(50)],
            450,
        ),
        (filter_on(backend, is_even) | on(backend, plus_one), list(range(1, 500, 2)), 250),
        (
            flat_on(backend, five_each) | filter_on(backend, last_of_five),
            [5 * n + 4 for n in range(500)],
            2000,
        ),
        (  # a route's joiner gets the drops one by one
            route(is_even, on(backend, plus_one), filter_on(backend, keep_ends)),
            [n + 1 if n % 2 == 0 else n for n in range(500) if n % 2 == 0 or n % 10 == 9],
            200,
        ),
    ]
    for pipeline, expected, dropped in cases:
        run = pipeline.run(range(500), ordered=ordered)
        got = [r.unwrap() for r in run]
        assert got == expected if ordered else sorted(got) == expected
        stats = run.statistics()
        assert (stats.items_read, stats.done, stats.in_flight) == (500, 500, 0)
        assert max(s.filtered for s in stats.stages) == dropped  # (a route counts its branches)
    # Behind a batch, the items it took in are dropped together too (a batch holds
    # its items in the order they came, not in input order).
    run = on(backend, plus_one).batch(64).unbatch().run(range(500), ordered=ordered)
    assert sorted(r.unwrap() for r in run) == list(range(1, 501))
    assert (run.statistics().done, run.statistics().in_flight) == (500, 0)
    assert leftovers() == ([], [])


def some_outputs(n: int) -> list[int]:
    """One output for most items, none or three for some; item 77 fails."""
    if n == 77:
        raise ValueError("seventy-seven")
    return [10 * n + i for i in range((1, 1, 1, 0, 3)[n % 5])]


@pytest.mark.parametrize("ordered", [True, False])
def test_an_items_only_output_is_in_its_place(backend: Backend, ordered: bool) -> None:
    # An item's only output keeps the item's key (it then costs what a map's output
    # costs); mixed with items that make none or several, nested, under retries (a
    # kernel's other path) and inside a route, every input still ends as its
    # outputs, in order, or as one Failure.
    def model(n: int, depth: int) -> list[int | str]:
        if n == 77:
            return ["failed"]
        if depth == 1:
            return [x + 1 for x in some_outputs(n)]
        return [y for x in some_outputs(n) for y in model(x, depth - 1)]

    retrying = flat_map(workers=2, backend="thread" if backend == "task" else backend, retries=1)
    cases: list[tuple[Pipeline[int, int] | Stage[int, int], list[int | str]]] = [
        (
            flat_on(backend, some_outputs) | flat_on(backend, some_outputs) | on(backend, plus_one),
            [y for n in range(300) for y in model(n, 2)],
        ),
        (
            retrying(some_outputs) | on(backend, plus_one),
            [y for n in range(300) for y in model(n, 1)],
        ),
        (
            route(
                is_even, flat_on(backend, some_outputs) | on(backend, plus_one), on(backend, negate)
            ),
            [y for n in range(300) for y in (model(n, 1) if n % 2 == 0 else [-n])],
        ),
    ]
    for pipeline, expected in cases:
        run = pipeline.run(range(300), ordered=ordered)
        got = [r.unwrap() if isinstance(r, Success) else "failed" for r in run]
        assert got == expected if ordered else Counter(got) == Counter(expected)
        stats = run.statistics()
        assert (stats.items_read, stats.done, stats.in_flight) == (300, 300, 0)
    assert leftovers() == ([], [])


class Ambiguous:
    """A verdict with no truth value (as a NumPy array of several elements)."""

    def __bool__(self) -> bool:
        raise ValueError("the truth value is ambiguous")


def ambiguous_at_500(n: int) -> object:
    return Ambiguous() if n == 500 else n % 2 == 0


@pytest.mark.parametrize("retries", [0, 1])
def test_a_verdict_without_a_truth_value_fails_its_item_alone(
    backend: Backend, retries: int
) -> None:
    # Its truth is taken as part of the call: it failed the whole batch (thread,
    # task) or crashed the worker (process).
    if backend == "task":

        async def verdict(n: int) -> object:
            return ambiguous_at_500(n)

        evens: Stage[int, int] = keep(verdict, backend="task", retries=retries, backoff=0.0)
    else:
        evens = keep(ambiguous_at_500, backend=backend, retries=retries, backoff=0.0)
    results = list(evens.run(range(1000)))
    failures = [r.failure() for r in results if isinstance(r, Failure)]
    assert [(f.item, type(f.exception)) for f in failures] == [(500, ValueError)]
    assert failures[0].attempts == 1 + retries
    kept = [r.unwrap() for r in results if isinstance(r, Success)]
    assert kept == [n for n in range(0, 1000, 2) if n != 500]


def test_keep_type_and_fluent_keep() -> None:
    assert [r.unwrap() for r in keep_type(str).run([1, "a", None, "b"])] == ["a", "b"]
    pipeline = stage(length).keep(lambda n: n > 3)
    assert [r.unwrap() for r in pipeline.run(["a", "abcd", "abcde"])] == [4, 5]
    with pytest.raises(DefinitionError, match="needs a class"):
        keep_type(list[int])  # accepted by the type checkers, refused at run time


def flaky_check(hang: Callable[[float], object]) -> Callable[[int], bool]:
    """Keeps what is not a multiple of 3; odd items fail their first call; item 4
    hangs in ``hang(10)`` (past any timeout here)."""
    calls: dict[int, int] = {}

    def checked(x: int) -> bool:
        calls[x] = calls.get(x, 0) + 1
        if x % 2 and calls[x] == 1:
            raise ConnectionError(f"flaky {x}")
        if x == 4:
            hang(10)
        return x % 3 != 0

    return checked


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_a_filter_takes_the_options_of_a_stage(backend: Backend) -> None:
    release = threading.Event()  # a hung thread is let go at the end; a process is stopped
    checked = flaky_check(release.wait if backend == "thread" else time.sleep)
    checks = keep(
        checked,
        workers=2,
        backend=backend,
        timeout=0.5,
        retries=1,
        retry_on=(ConnectionError,),
        backoff=0.001,
        max_backoff=0.01,
    )
    try:
        run = checks.run(range(10))
        results = list(run)
    finally:
        release.set()
    assert [r.unwrap() for r in results if isinstance(r, Success)] == [1, 2, 5, 7, 8]
    failures = [r.failure() for r in results if isinstance(r, Failure)]
    assert [(f.item, type(f.exception)) for f in failures] == [(4, StageTimeout)]
    stats = run.statistics().stages[0]
    assert (stats.retried, stats.timed_out, stats.filtered) == (5, 1, 4)
    limited = flat_map(rate=50.0, max_backoff=1.0, buffer=3)(split_words)
    assert (limited.options.rate, limited.options.max_backoff) == (50.0, 1.0)


# -- batches ----------------------------------------------------------------------------


def test_batch_by_size_then_unbatch(backend: Backend) -> None:
    # A batch holds items in the order they reach it: with several workers
    # upstream that is not the input order...
    pipeline = on(backend, length).batch(4).unbatch()
    assert Counter(r.unwrap() for r in pipeline.run(WORDS)) == Counter(map(len, WORDS))
    # ...with one worker it is.
    in_order = on(backend, length, workers=1).batch(4).unbatch()
    assert [r.unwrap() for r in in_order.run(WORDS)] == [len(w) for w in WORDS]
    sizes = [len(r.unwrap()) for r in on(backend, length, workers=1).batch(4).run(WORDS)]
    assert sizes == [4, 4, 1]


def test_a_slow_trickle_is_flushed_by_the_timeout() -> None:
    release = threading.Event()

    def trickle() -> Iterator[int]:
        yield 1
        yield 2
        release.wait(10)  # the first batch must come out before this returns
        yield 3

    batches: Stage[int, list[int]] = batch(100, timeout=0.05)
    run = batches.run(trickle())
    first = next(run).unwrap()
    release.set()
    assert first == [1, 2]
    assert [r.unwrap() for r in run] == [[3]]


def ten_copies(word: str) -> list[str]:
    return [word] * 10


def test_batch_options_are_checked() -> None:
    with pytest.raises(DefinitionError, match="batch size"):
        batch(0)
    with pytest.raises(DefinitionError, match="batch timeout"):
        batch(2, timeout=0)
    with pytest.raises(DefinitionError, match="smaller than a batch"):
        stage(length).batch(10).run(["a"], window=5)


def test_a_batch_behind_a_one_to_many_stage_may_be_larger_than_the_window() -> None:
    # One input makes ten outputs: a window of 2 inputs still fills a batch of 10.
    tens = flat_map(ten_copies).batch(10)
    assert [r.unwrap() for r in tens.run(["a", "b"], window=2)] == [["a"] * 10, ["b"] * 10]


def test_an_ordered_batch_whose_first_item_is_late_is_flushed_when_the_window_is_full() -> None:
    # Item 0 reaches the batch stage after a list with items 1-4 went on: 0 holds
    # back every result after it, the window (5) is full, no more input is read,
    # and the list [0] could only be flushed by its timeout (120 s, past the test's
    # own timeout) -- unless the stage sees that and flushes it.
    went_on = threading.Event()

    def late_zero(n: int) -> int:
        if n == 0:
            went_on.wait(30)
        return n

    def note(items: list[int]) -> list[int]:
        if 4 in items:
            went_on.set()
        return items

    pipeline = stage(workers=2)(late_zero).batch(4, timeout=120.0) | stage(note)
    lists = [r.unwrap() for r in pipeline.run(range(6), window=5)]
    assert sorted(n for items in lists for n in items) == list(range(6))
    assert went_on.is_set()


def always(word: str) -> bool:
    return True


def test_batches_in_a_route_s_branches_count_for_the_window() -> None:
    # The window's checks and default see inside forks and routes: a batch there
    # was cut short by the default window (and flushed only by its timeout), and
    # a window smaller than it was accepted.
    batched = route(always, stage(length).batch(3000, timeout=60.0), stage(length).batch(1))
    sizes = [len(r.unwrap()) for r in batched.run(["a"] * 6000)]
    assert sizes == [3000, 3000]
    with pytest.raises(DefinitionError, match="smaller than a batch of 3000"):
        batched.run(["a"], window=5)
    # Behind a one-to-many branch a batch is not bounded by the window, as behind
    # a one-to-many stage.
    tens = route(always, flat_map(ten_copies), flat_map(ten_copies)).batch(10)
    assert [r.unwrap() for r in tens.run(["a", "b"], window=2)] == [["a"] * 10, ["b"] * 10]


def test_a_batch_of_batches_needs_the_product_of_their_sizes_in_the_window() -> None:
    # batch(100).batch(100) needs 10 000 input items per list: the default window
    # (about 1 300) cut every list short, each flushed by its timeout, and a window
    # of the larger size alone (100) was accepted.
    nested = stage(length).batch(100, timeout=60.0).batch(100, timeout=60.0)
    lists = [r.unwrap() for r in nested.run(["a"] * 20_000)]
    assert [len(inner) for outer in lists for inner in outer] == [100] * 200
    assert [len(outer) for outer in lists] == [100, 100]
    with pytest.raises(DefinitionError, match="smaller than a batch of 10000"):
        nested.run(["a"], window=9_999)


# -- stateful stages ----------------------------------------------------------------------


class Journal:
    """Records lifecycle events in files, so that every backend's workers can write them."""

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)

    def write(self, event: str) -> None:
        name = f"{event}-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex}"
        (Path(self.folder) / name).touch()

    def count(self, event: str) -> int:
        return len(list(Path(self.folder).glob(f"{event}-*")))

    def pids(self, event: str) -> set[int]:
        return {int(p.name.split("-")[1]) for p in Path(self.folder).glob(f"{event}-*")}


def make_numberer(
    backend: Backend, journal: Journal, fail_on: int | None = None, *, shared: bool = False
) -> Stage[int, str]:
    if backend == "task":

        class AsyncNumberer(AsyncStatefulStage[int, str], workers=3, backend="task", shared=shared):
            async def setup(self) -> None:
                journal.write("setup")
                self.seen = 0
                self.tag = uuid.uuid4().hex

            async def process(self, item: int, /) -> str:
                if item == fail_on:
                    raise RuntimeError("boom")
                self.seen += 1
                await asyncio.sleep(0)
                return f"{self.tag}:{self.seen}"

            async def teardown(self) -> None:
                journal.write("teardown")

        return AsyncNumberer()

    class Numberer(StatefulStage[int, str], workers=3, backend=backend, shared=shared):
        def setup(self) -> None:
            journal.write("setup")
            self.seen = 0
            self.tag = uuid.uuid4().hex

        def process(self, item: int, /) -> str:
            if item == fail_on:
                raise RuntimeError("boom")
            self.seen += 1
            return f"{self.tag}:{self.seen}"

        def teardown(self) -> None:
            journal.write("teardown")

    return Numberer()


def test_stateful_stage_sets_up_once_per_worker_and_tears_down(
    backend: Backend, tmp_path: Path
) -> None:
    journal = Journal(tmp_path)
    results = [r.unwrap() for r in make_numberer(backend, journal).run(range(300))]
    assert len(results) == 300
    assert 1 <= journal.count("setup") <= 3
    assert journal.count("teardown") == journal.count("setup")
    # Each worker counts only its own items: state is not shared.
    per_worker = Counter(r.split(":")[0] for r in results)
    assert sum(per_worker.values()) == 300
    assert len(per_worker) == journal.count("setup")
    if backend == "process":
        assert os.getpid() not in journal.pids("setup")  # set up inside the worker


def test_stateful_teardown_after_failures_and_cancellation(
    backend: Backend, tmp_path: Path
) -> None:
    journal = Journal(tmp_path)
    results = list(make_numberer(backend, journal, fail_on=5).run(range(20)))
    assert isinstance(results[5], Failure)
    assert journal.count("teardown") == journal.count("setup") >= 1
    cancelled = Journal(tmp_path / "cancelled")
    (tmp_path / "cancelled").mkdir()
    run = make_numberer(backend, cancelled).run(itertools.count())
    run.take(10)  # closes the run: every worker is cancelled
    assert cancelled.count("teardown") == cancelled.count("setup") >= 1


def test_a_shared_stateful_stage_gives_all_its_workers_one_object(
    backend: Backend, tmp_path: Path
) -> None:
    journal = Journal(tmp_path)
    numberer = make_numberer(backend, journal, shared=True)
    tags = Counter(r.unwrap().split(":")[0] for r in numberer.run(range(300)))
    assert sum(tags.values()) == 300
    assert journal.count("teardown") == journal.count("setup")
    if backend == "process":  # one worker per process: each has its own object
        assert len(tags) == journal.count("setup") <= 3
    else:
        assert len(tags) == journal.count("setup") == 1
    # Torn down once, when the last worker ends, also when the run is cancelled;
    # the next run sets it up again.
    cancelled = Journal(tmp_path / "cancelled")
    (tmp_path / "cancelled").mkdir()
    for _ in range(2):
        make_numberer(backend, cancelled, shared=True).run(itertools.count()).take(10)
    assert cancelled.count("teardown") == cancelled.count("setup")
    if backend != "process":
        assert cancelled.count("setup") == 2
    assert leftovers() == ([], [])


class SharedWithAStuckCall(StatefulStage[int, int], workers=2, timeout=0.2, shared=True):
    events: ClassVar[list[str]] = []
    release: ClassVar[threading.Event] = threading.Event()
    torn_down: ClassVar[threading.Event] = threading.Event()

    def setup(self) -> None:
        SharedWithAStuckCall.events.append("setup")

    def process(self, item: int, /) -> int:
        if item == 3:
            SharedWithAStuckCall.release.wait(30)
        return item

    def teardown(self) -> None:
        SharedWithAStuckCall.events.append("teardown")
        SharedWithAStuckCall.torn_down.set()


def test_a_shared_object_outlives_a_call_abandoned_after_its_timeout() -> None:
    # The thread of the abandoned call still uses the object: the teardown waits
    # for it, then runs once.
    stage_ = SharedWithAStuckCall
    stage_.events.clear()
    stage_.release.clear()
    stage_.torn_down.clear()
    results = list(stage_().run(range(8)))
    assert [r.unwrap() for r in results if not isinstance(r, Failure)] == [0, 1, 2, 4, 5, 6, 7]
    assert isinstance(results[3].failure().exception, StageTimeout)
    assert stage_.events == ["setup"]
    stage_.release.set()
    assert stage_.torn_down.wait(30)
    assert stage_.events == ["setup", "teardown"]


class SharedBrokenSetup(StatefulStage[int, int], workers=3, shared=True):
    tries: ClassVar[list[int]] = []

    def setup(self) -> None:
        SharedBrokenSetup.tries.append(1)
        raise ConnectionRefusedError("no database")

    def process(self, item: int, /) -> int:
        return item


class AsyncSharedBrokenSetup(AsyncStatefulStage[int, int], workers=3, backend="task", shared=True):
    tries: ClassVar[list[int]] = []

    async def setup(self) -> None:
        AsyncSharedBrokenSetup.tries.append(1)
        await asyncio.sleep(0)  # the other workers wait for it meanwhile
        raise ConnectionRefusedError("no database")

    async def process(self, item: int, /) -> int:
        return item


@pytest.mark.parametrize("make", [SharedBrokenSetup, AsyncSharedBrokenSetup])
def test_a_failing_shared_setup_runs_once_and_stops_the_run(
    make: type[SharedBrokenSetup | AsyncSharedBrokenSetup],
) -> None:
    make.tries.clear()
    with pytest.raises(ConnectionRefusedError, match="no database"):
        list(make().run(itertools.count()))
    assert len(make.tries) == 1
    assert leftovers() == ([], [])


def test_a_shared_async_stateful_stage_needs_the_task_backend() -> None:
    def define() -> None:
        class Wrong(AsyncStatefulStage[int, int], workers=4, shared=True):
            async def process(self, item: int, /) -> int:
                return item

        del Wrong  # never reached: defining it raises

    with pytest.raises(DefinitionError, match="shared=True needs backend='task'"):
        define()

    def define_text() -> None:
        class Wrong(StatefulStage[int, int], shared="yes"):  # type: ignore[arg-type] # untyped callers
            def process(self, item: int, /) -> int:
                return item

        del Wrong  # never reached: defining it raises

    with pytest.raises(DefinitionError, match="shared='yes' is not allowed"):
        define_text()


class SlowToClose(AsyncStatefulStage[int, int], workers=2, backend="task"):
    """Its teardown awaits, as closing a client session does."""

    events: ClassVar[list[str]] = []

    async def setup(self) -> None:
        SlowToClose.events.append("opened")

    async def process(self, item: int, /) -> int:
        return item

    async def teardown(self) -> None:
        await asyncio.sleep(0.02)
        await asyncio.sleep(0)
        SlowToClose.events.append("closed")


def test_a_run_closed_early_waits_for_an_async_teardown_to_end() -> None:
    # A cancelled task worker's teardown was cancelled in turn at its first await.
    events = SlowToClose.events
    events.clear()
    assert [r.unwrap() for r in SlowToClose().run(itertools.count()).take(3)] == [0, 1, 2]
    assert events.count("closed") == events.count("opened") >= 1  # before take() returned
    with SlowToClose().run(itertools.count()) as run:
        next(run)
    assert events.count("closed") == events.count("opened") >= 2
    assert leftovers() == ([], [])


class BrokenSetup(StatefulStage[int, int]):
    def setup(self) -> None:
        raise ConnectionRefusedError("no database")

    def process(self, item: int, /) -> int:
        return item


def test_a_failing_setup_fails_the_run_fast_with_that_error() -> None:
    with pytest.raises(ConnectionRefusedError, match="no database"):
        list(BrokenSetup().run(itertools.count()))
    assert leftovers() == ([], [])


class SlowTeardownInAProcess(StatefulStage[int, int], backend="process"):
    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)

    def process(self, item: int, /) -> int:
        return item

    def teardown(self) -> None:
        time.sleep(1.5)  # flushing a buffer: longer than a cancelled worker's second
        (Path(self.folder) / f"torn-down-{os.getpid()}").touch()


def test_a_process_worker_s_teardown_may_take_its_time_at_the_end(tmp_path: Path) -> None:
    # A worker told to stop was killed a second later, its teardown cut short.
    assert [r.unwrap() for r in SlowTeardownInAProcess(tmp_path).run(range(5))] == list(range(5))
    assert len(list(tmp_path.glob("torn-down-*"))) == 1
    assert leftovers() == ([], [])


class AsyncBrokenSetup(AsyncStatefulStage[int, int], backend="task"):
    tries: ClassVar[list[int]] = []

    async def setup(self) -> None:
        AsyncBrokenSetup.tries.append(1)
        raise ConnectionRefusedError("no database")

    async def process(self, item: int, /) -> int:
        return item


def test_a_failing_async_setup_runs_once_per_worker() -> None:
    # A task worker ran it again for every batch until the run stopped.
    AsyncBrokenSetup.tries.clear()
    with pytest.raises(ConnectionRefusedError, match="no database"):
        list(AsyncBrokenSetup().run(itertools.count()))
    assert len(AsyncBrokenSetup.tries) == 1
    assert leftovers() == ([], [])


class HoldsALock(StatefulStage[int, int]):
    def __init__(self) -> None:
        self.lock = threading.Lock()  # belongs in setup(): each worker copies the object

    def process(self, item: int, /) -> int:
        return item


class HoldsALockInAProcess(HoldsALock, backend="process"):
    pass


class SharedHoldsALock(HoldsALock, workers=2, shared=True):
    pass


def test_a_shared_stage_object_that_cannot_be_copied_is_named_as_copied_once() -> None:
    with pytest.raises(TypeError, match=r"the stage object is copied for the run") as caught:
        list(SharedHoldsALock().run(range(5)))
    assert "in setup(), not in __init__" in str(caught.value)
    assert leftovers() == ([], [])


@pytest.mark.parametrize("make", [HoldsALock, HoldsALockInAProcess])
def test_a_stage_object_that_cannot_be_copied_stops_the_run_with_the_fix(
    make: Callable[[], Stage[int, int]],
) -> None:
    # Threads failed every item with "cannot pickle '_thread.lock' object"; processes
    # advised backend='thread'.
    with pytest.raises((TypeError, DefinitionError), match=r"in setup\(\), not in __init__"):
        list(make().run(range(5)))
    assert leftovers() == ([], [])


class SlowToOpen(AsyncStatefulStage[int, int], backend="task"):
    events: ClassVar[list[str]] = []
    opening: ClassVar[threading.Event] = threading.Event()

    async def setup(self) -> None:
        SlowToOpen.events.append("opening")
        SlowToOpen.opening.set()
        await asyncio.sleep(0.2)  # a slow connect
        SlowToOpen.events.append("opened")

    async def process(self, item: int, /) -> int:
        return item

    async def teardown(self) -> None:
        SlowToOpen.events.append("closed")


def test_a_run_closed_during_an_async_setup_lets_it_end_and_tears_it_down() -> None:
    # The setup was cancelled at its await, and what it opened was never closed.
    SlowToOpen.events.clear()
    SlowToOpen.opening.clear()
    run = SlowToOpen().run(itertools.count())
    run.start()
    assert SlowToOpen.opening.wait(10)
    run.close()
    assert SlowToOpen.events == ["opening", "opened", "closed"]
    assert leftovers() == ([], [])


class SharedSlowToOpen(SlowToOpen, workers=4, backend="task", shared=True):
    pass


def test_a_run_closed_during_a_shared_async_setup_lets_it_end_and_tears_it_down_once() -> None:
    SlowToOpen.events.clear()
    SlowToOpen.opening.clear()
    run = SharedSlowToOpen().run(itertools.count())
    run.start()
    assert SlowToOpen.opening.wait(10)
    run.close()
    assert SlowToOpen.events == ["opening", "opened", "closed"]
    assert leftovers() == ([], [])


class DatabaseDown(Exception):
    def __init__(self, host: str, code: int) -> None:  # does not unpickle: two arguments
        super().__init__(f"cannot reach {host}: {code}")


class SetupRaisesWhatDoesNotPickle(StatefulStage[int, int], workers=2, backend="process"):
    def setup(self) -> None:
        raise DatabaseDown("db.local", 61)

    def process(self, item: int, /) -> int:
        return item


class SetupExits(StatefulStage[int, int], workers=2):
    def setup(self) -> None:
        sys.exit("no configuration")

    def process(self, item: int, /) -> int:
        return item


class SetupExitsInAProcess(SetupExits, backend="process"):
    pass


class AsyncSetupExits(AsyncStatefulStage[int, int], workers=2, backend="task"):
    async def setup(self) -> None:
        await asyncio.sleep(0)
        sys.exit("no configuration")

    async def process(self, item: int, /) -> int:
        return item


class SharedAsyncSetupExits(AsyncSetupExits, workers=2, backend="task", shared=True):
    pass


def test_a_setup_error_that_does_not_pickle_still_stops_the_run() -> None:
    # It used to fail every item (endlessly, on an endless input) as a RuntimeError.
    with pytest.raises(RuntimeError, match=r"DatabaseDown: cannot reach db.local: 61") as caught:
        list(SetupRaisesWhatDoesNotPickle().run(itertools.count()))
    assert isinstance(caught.value.__cause__, RemoteTraceback)  # the worker's traceback
    assert "DatabaseDown" in caught.value.__cause__.text
    assert leftovers() == ([], [])


@pytest.mark.parametrize(
    "make", [SetupExits, SetupExitsInAProcess, AsyncSetupExits, SharedAsyncSetupExits]
)
def test_a_setup_that_exits_stops_the_run_with_its_system_exit(
    make: Callable[[], Stage[int, int]],
) -> None:
    # It used to fail every item on threads and crash every worker on processes;
    # an async setup's SystemExit on tasks escaped the run's event loop, and the
    # run ended with "typeflow lost track of items".
    with pytest.raises(SystemExit, match="no configuration"):
        list(make().run(itertools.count()))
    assert leftovers() == ([], [])


class Flaky(
    StatefulStage[int, int],
    retries=2,
    retry_on=(ConnectionError,),
    backoff=0.001,
    max_backoff=0.002,
):
    """Fails each item's first two calls, then passes it on."""

    def setup(self) -> None:
        self.calls: Counter[int] = Counter()

    def process(self, item: int, /) -> int:
        self.calls[item] += 1
        if self.calls[item] <= 2:
            raise ConnectionError(f"try {self.calls[item]}")
        return item


def test_a_stateful_stage_takes_every_retry_option_as_a_class_keyword() -> None:
    flaky = Flaky()
    assert (flaky.options.backoff, flaky.options.max_backoff) == (0.001, 0.002)
    run = flaky.run(range(3))
    assert [r.unwrap() for r in run] == [0, 1, 2]
    assert run.statistics().stages[0].retried == 6


def test_a_sync_stateful_stage_is_refused_on_the_task_backend() -> None:
    def define() -> None:
        class Wrong(StatefulStage[int, int], backend="task"):
            def process(self, item: int, /) -> int:
                return item

        del Wrong  # never reached: defining it raises

    with pytest.raises(DefinitionError, match="AsyncStatefulStage"):
        define()


# -- sinks, limits, feeds, merges ---------------------------------------------------------


def test_consume_runs_for_effects_and_reports_failures(backend: Backend, tmp_path: Path) -> None:
    journal = Journal(tmp_path)

    def save(n: int) -> None:
        if n == 3:
            raise OSError("disk full")
        journal.write(f"row{n}")

    failures = on(backend, save).run(range(10)).consume()
    assert [f.item for f in failures] == [3]
    assert sum(journal.count(f"row{n}") for n in range(10)) == 9


def test_take_stops_an_endless_pipeline(backend: Backend) -> None:
    pipeline = on(backend, length) | on(backend, is_even)
    results = pipeline.run("x" * n for n in itertools.count()).take(5)
    assert [r.unwrap() for r in results] == [True, False, True, False, True]
    assert leftovers() == ([], [])


def test_feed_from_several_threads(backend: Backend) -> None:
    with on(backend, length).feed() as feed:

        def producer(prefix: str) -> None:
            for i in range(200):
                feed.put(prefix * (i % 7 + 1))

        threads = [threading.Thread(target=producer, args=(c,)) for c in "abc"]
        for t in threads:
            t.start()
        results: list[int] = []
        reader = threading.Thread(target=lambda: results.extend(r.unwrap() for r in feed))
        reader.start()
        for t in threads:
            t.join()
        feed.close()
        reader.join(30)
    assert Counter(results) == Counter((i % 7 + 1) for _ in "abc" for i in range(200))
    with pytest.raises(FeedClosed, match="closed feed"):
        feed.put("late")


def test_a_put_into_a_feed_nobody_reads_gives_up_after_its_timeout(backend: Backend) -> None:
    # One thread that puts more than the feed holds before it reads would wait for
    # ever; with a timeout the put fails, the item is not put, and nothing else is lost.
    with on(backend, length).feed(capacity=4, window=4) as feed:
        put: list[str] = []

        def put_until_full() -> None:
            for i in range(10_000):
                word = "x" * (i % 5 + 1)
                feed.put(word, timeout=0.05)
                put.append(word)

        with pytest.raises(TimeoutError, match="read them in another thread"):
            put_until_full()
        got: list[int] = []
        reader = threading.Thread(target=lambda: got.extend(r.unwrap() for r in feed))
        reader.start()  # reading makes room
        feed.put("yy", timeout=math.inf)  # as long as it takes (it was an OverflowError)
        feed.close()
        reader.join(30)
    assert 1 <= len(put) <= 4 + 4 + 1  # the buffer, the window, the reader's chunk
    assert got == [len(w) for w in put] + [2]


def test_a_feed_is_read_with_async_for_without_blocking_the_event_loop(backend: Backend) -> None:
    async def main() -> tuple[list[int], int]:
        async with on(backend, length).feed(capacity=4) as feed:

            async def producer() -> None:
                await reading.wait()  # only once the reader waits for results
                for i in range(300):
                    await feed.aput("x" * (i % 5 + 1))
                feed.close()

            reading = asyncio.Event()
            task = asyncio.get_running_loop().create_task(producer())
            results: list[int] = []
            iterator = aiter(feed)
            first = asyncio.ensure_future(anext(iterator))
            await asyncio.sleep(0)  # the reader is waiting now: a blocked loop would hang
            reading.set()
            results.append((await first).unwrap())
            results.extend([r.unwrap() async for r in iterator])
            await task
        return results, feed.run.statistics().in_flight

    results, in_flight = asyncio.run(main())
    assert results == [i % 5 + 1 for i in range(300)]
    assert in_flight == 0
    assert leftovers() == ([], [])


def test_leaving_async_with_on_an_error_cancels_the_feed() -> None:
    async def main() -> None:
        async with stage(length).feed() as feed:
            await feed.aput("ab")
            raise LookupError("the consumer failed")

    with pytest.raises(LookupError):
        asyncio.run(main())
    assert leftovers() == ([], [])


def test_leaving_async_for_over_a_feed_early_leaves_the_feed_running(backend: Backend) -> None:
    # As a for loop over the feed: a break, an exception in the loop's body and a
    # wait cut short by a timeout leave the feed running, and every item put
    # still has its result (they used to stop the feed's run and drop them).
    async def main() -> list[int]:
        async with on(backend, length).feed() as feed:
            for word in ("a", "bb", "ccc"):
                await feed.aput(word)
            got: list[int] = []
            async for result in feed:
                got.append(result.unwrap())
                break
            try:
                async for result in feed:
                    got.append(result.unwrap())
                    raise LookupError("the loop's body failed")
            except LookupError:
                pass
            got.append((await anext(aiter(feed))).unwrap())
            with pytest.raises(TimeoutError):  # nothing was put: no result can come
                await asyncio.wait_for(anext(aiter(feed)), 0.05)
            await feed.aput("dddd")
            feed.close()
            got.extend([r.unwrap() async for r in feed])
        return got

    assert asyncio.run(main()) == [1, 2, 3, 4]
    assert leftovers() == ([], [])


def test_fail_fast_stops_an_async_run_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # Stopping a run joins its workers: an async run does it in a thread (it was
    # done on the caller's loop when fail_fast raised, stalling it meanwhile).
    from typeflow._runtime import _run

    on_loop: list[bool] = []
    shutdown = _run.RunCore.shutdown

    def recorded(core: _run.RunCore) -> None:
        on_loop.append(_run._on_running_loop())  # pyright: ignore[reportPrivateUsage] - the check under test
        shutdown(core)

    monkeypatch.setattr(_run.RunCore, "shutdown", recorded)

    def fail_first(x: int) -> int:
        if x == 0:
            raise ValueError("the first item is bad")
        return x

    async def main() -> None:
        with pytest.raises(StageError, match="the first item is bad"):
            async for _ in stage(fail_first).arun(range(100), fail_fast=True):
                pass

    asyncio.run(main())
    assert on_loop
    assert not any(on_loop)
    assert leftovers() == ([], [])


def test_merge_sources_and_pipelines() -> None:
    merged = list(merge(range(5), ["a", "b"]))
    assert Counter(merged) == Counter([*range(5), "a", "b"])
    runs = merge(stage(length).run(["ab", "c"]), stage(is_even).run([1, 2]))
    assert sorted(str(r.unwrap()) for r in runs) == ["1", "2", "False", "True"]

    def broken() -> Iterator[int]:
        yield 1
        raise OSError("source failed")

    with pytest.raises(OSError, match="source failed"):
        list(merge(broken(), itertools.repeat(0, 10)))


def _join_merge_readers() -> None:
    for thread in threading.enumerate():
        if thread.name.startswith("typeflow:merge:"):
            thread.join(10)


def test_a_merge_raises_a_source_s_error_while_another_source_waits() -> None:
    # The error came out only once every other source had ended or yielded again.
    release = threading.Event()

    def broken() -> Iterator[int]:
        yield from (1, 2, 3)
        raise OSError("source a broke")

    def quiet() -> Iterator[int]:
        release.wait(30)  # a socket with nothing to say
        yield 99

    got: list[int] = []
    with pytest.raises(OSError, match="source a broke"):
        got.extend(merge(broken(), quiet()))  # what came before the error stays
    assert got == [1, 2, 3]
    release.set()
    _join_merge_readers()
    assert leftovers() == ([], [])


def test_a_merge_nobody_holds_stops_reading_and_closes_its_sources() -> None:
    closed: list[str] = []

    def endless(name: str) -> Iterator[int]:
        try:
            yield from itertools.count()
        finally:
            closed.append(name)

    merged = merge(endless("a"), endless("b"))
    next(merged)
    del merged  # its readers held it alive: they read on forever
    _join_merge_readers()
    assert sorted(closed) == ["a", "b"]
    # A run over merged runs: closing it closes them, and their workers stop.
    inner = merge(stage(plus_one).run(itertools.count()), stage(negate).run(itertools.count()))
    assert len(stage(repr).run(inner).take(5)) == 5
    del inner
    _join_merge_readers()
    assert leftovers() == ([], [])


def test_run_accepts_failed_items_from_errors_in_the_middle() -> None:
    pipeline = flat_map(split_words) | stage(length) | keep(is_even)
    results = list(pipeline.run(["aa bbb", "cccc"]))
    assert [r.unwrap() for r in results] == [2, 4]
    assert all(isinstance(r, Success) for r in results)
    error_free: list[StageError] = pipeline.run(["x"]).consume()
    assert error_free == []


def tens(n: int) -> list[int]:
    """Nothing for a multiple of 3, n and n + 0.5 otherwise; raises on a multiple of 7."""
    if n % 7 == 0:
        raise ValueError(f"{n} is a multiple of 7")
    return [] if n % 3 == 0 else [10 * n, 10 * n + 5]


def test_filters_and_one_to_many_stages_last_hand_whole_batches_over_in_order(
    backend: Backend,
) -> None:
    # Alone, each batch of the last stage is a run of consecutive positions (handed
    # to the caller in one entry); behind two workers, its batches interleave.
    def kept(y: int) -> list[int]:
        return [y] if y % 2 == 0 else []

    def made(y: int) -> list[int]:  # what tens makes of y, or y itself where it fails
        return [y] if y % 7 == 0 else tens(y)

    n = 3000
    cases: list[tuple[Stage[int, int] | Pipeline[int, int], Callable[[int], list[int]]]] = [
        (filter_on(backend, is_even), kept),
        (on(backend, negate) | filter_on(backend, is_even), lambda x: kept(-x)),
        (flat_on(backend, tens), made),
        (on(backend, negate) | flat_on(backend, tens), lambda x: made(-x)),
    ]
    for pipeline, reference in cases:
        expected = [y for x in range(n) for y in reference(x)]
        for ordered in (True, False):
            run = pipeline.run(range(n), ordered=ordered)
            got = [r.unwrap() if isinstance(r, Success) else r.failure().item for r in run]
            assert got == expected if ordered else Counter(got) == Counter(expected)
            stats = run.statistics()
            assert stats.in_flight == 0
            assert stats.stages[-1].items_in == n


def make_a_lock_from_one(n: int) -> list[object]:
    return [n, threading.Lock(), n] if n == 1 else [n, n]


@pytest.mark.parametrize("ordered", [True, False])
def test_a_one_to_many_call_with_an_output_that_does_not_pickle_fails_as_one_item(
    ordered: bool,
) -> None:
    # Item 1's outputs do not go on (not even those that pickle), its failure names it.
    expand = flat_map(workers=1, backend="process")(make_a_lock_from_one)
    run = expand.run(range(6), ordered=ordered)
    results = list(run)
    (failure,) = [r.failure() for r in results if isinstance(r, Failure)]
    assert failure.item == 1
    assert "cannot be sent back from its worker process" in str(failure.exception)
    values = [r.unwrap() for r in results if isinstance(r, Success)]
    expected = [0, 0, 2, 2, 3, 3, 4, 4, 5, 5]
    assert values == expected if ordered else Counter(values) == Counter(expected)
    stats = run.statistics()
    assert (stats.items_read, stats.done, stats.in_flight) == (6, 6, 0)
    assert (stats.succeeded, stats.failed) == (10, 1)


# -- fork/join and routing ----------------------------------------------------------------


def shout(word: str) -> str:
    return word.upper()


def fail_on_x(word: str) -> str:
    if "x" in word.lower():
        raise ValueError(f"no x in {word!r}")
    return word


def test_fork_joins_each_items_branch_results(backend: Backend) -> None:
    second: Backend = "thread" if backend == "process" else "process"
    forked = fork(on(backend, length), on(second, shout) | on(backend, fail_on_x))
    results = list((stage(str.strip) | forked).run([" ab ", "x", "cde"] * 10))
    assert [r.unwrap() for r in results if isinstance(r, Success)] == [(2, "AB"), (3, "CDE")] * 10
    failures = [r.failure() for r in results if isinstance(r, Failure)]
    assert len(failures) == 10  # the branch's failure names the branch's stage
    assert all(f.stage == "fail_on_x" and f.item == "X" for f in failures)
    assert all(isinstance(f.exception, ValueError) for f in failures)


def test_fork_with_three_branches_and_unordered(backend: Backend) -> None:
    forked = fork(on(backend, length), on(backend, shout), on(backend, fail_on_x))
    got = [r.unwrap() for r in forked.run(["ab", "cd"] * 20, ordered=False)]
    assert len(got) == 40
    assert Counter(got) == Counter([(2, "AB", "ab"), (2, "CD", "cd")] * 20)


def test_fork_branches_must_be_one_to_one() -> None:
    with pytest.raises(DefinitionError, match="exactly one output"):
        fork(stage(length), flat_map(split_words))
    with pytest.raises(DefinitionError, match="at least two branches"):
        fork(stage(length))


def test_a_fork_may_hold_a_fork_or_a_route_that_makes_one_output_per_input(
    backend: Backend,
) -> None:
    inner_route = route(is_even, on(backend, negate), on(backend, plus_one))
    inner_fork = fork(on(backend, negate), on(backend, plus_one))
    forked = fork(on(backend, negate), inner_route, inner_fork)
    for ordered in (True, False):
        got = [r.unwrap() for r in forked.run(range(20), ordered=ordered)]
        expected = [(-x, -x if x % 2 == 0 else x + 1, (-x, x + 1)) for x in range(20)]
        assert got == expected if ordered else Counter(got) == Counter(expected)
    # A route that may drop or multiply an item does not join one result per branch.
    with pytest.raises(DefinitionError, match="exactly one output"):
        fork(on(backend, negate), route(is_even, on(backend, negate), filter_on(backend, is_even)))


def test_route_sends_each_item_to_one_branch(backend: Backend) -> None:
    def half(n: int) -> float:
        return n / 2

    def triple(n: int) -> float:
        return n * 3.0

    routed = route(is_even, on(backend, half), on(backend, triple).keep(lambda x: x < 20))
    run = routed.run(range(10))
    assert [r.unwrap() for r in run] == [0.0, 3.0, 1.0, 9.0, 2.0, 15.0, 3.0, 4.0]
    assert run.statistics().in_flight == 0


def test_a_fork_names_the_first_branch_that_failed(backend: Backend) -> None:
    forked = fork(on(backend, fail_on_x), on(backend, shout) | on(backend, fail_on_x))
    results = list(forked.run(["ab", "x", "cd"] * 30))
    assert [r.unwrap() for r in results if isinstance(r, Success)] == [
        ("ab", "AB"),
        ("cd", "CD"),
    ] * 30
    failures = [r.failure() for r in results if isinstance(r, Failure)]
    assert [(f.stage, f.item) for f in failures] == [("fail_on_x", "x")] * 30  # branch 0


def is_text(value: int | str) -> TypeIs[str]:
    return isinstance(value, str)


def test_a_route_whose_predicate_narrows_takes_what_its_otherwise_branch_takes() -> None:
    # ``then`` gets only the narrowed items: the route takes int | str, as the type
    # checkers say (an int was refused by the run-time composition check).
    @stage
    def shout(text: str) -> str:
        return text.upper()

    @stage
    def describe(value: int | str) -> str:
        return f"<{value}>"

    @stage
    def count(n: int) -> int:
        return n + 1

    labelled = route(is_text, shout, describe)
    assert [r.unwrap() for r in (count | labelled).run([1, 2])] == ["<2>", "<3>"]
    assert [r.unwrap() for r in labelled.run([1, "a"])] == ["<1>", "A"]

    @stage
    def raw(data: bytes) -> bytes:
        return data

    with pytest.raises(CompositionError, match="produces bytes"):
        raw | labelled  # type: ignore[operator] # the run-time check for untyped code


def test_statistics_name_nested_branches_by_their_path() -> None:
    # <fork>[<branch>]/<stage>, at any depth; a stage's row before the rows inside it.
    nested = fork(
        fork(stage(plus_one), stage(negate)), route(is_even, stage(plus_one), stage(negate))
    )
    run = nested.run(range(10))
    assert len(list(run)) == 10
    inner_fork, inner_route = "fork(plus_one, negate)", "route(is_even, plus_one, negate)"
    outer = f"fork({inner_fork}, {inner_route})"
    assert [row.name for row in run.statistics().stages] == [
        outer,
        f"{outer}[0]/{inner_fork}",
        f"{outer}[0]/{inner_fork}[0]/plus_one",
        f"{outer}[0]/{inner_fork}[1]/negate",
        f"{outer}[1]/{inner_route}",
        f"{outer}[1]/{inner_route}[0]/plus_one",
        f"{outer}[1]/{inner_route}[1]/negate",
    ]


def test_a_route_s_row_counts_what_its_branches_dropped() -> None:
    run = route(is_even, stage(plus_one).keep(lambda n: n < 5), stage(negate)).run(range(20))
    assert len(list(run)) == 12  # 10 odd items, and 2 of the even ones kept
    row = run.statistics().stages[0]
    assert (row.items_in, row.succeeded, row.failed, row.filtered) == (20, 12, 0, 8)


def exits_on_three(n: int) -> bool:
    if n == 3:
        sys.exit("a predicate that ends the program")
    return n % 2 == 0


def test_a_route_predicate_that_raises_system_exit_fails_its_item_alone() -> None:
    # As a stage's function does (it ended the run: every result was lost).
    results = list(route(exits_on_three, stage(plus_one), stage(negate)).run(range(6)))
    assert [r.unwrap() for r in results if isinstance(r, Success)] == [1, -1, 3, 5, -5]
    (failure,) = [r.failure() for r in results if isinstance(r, Failure)]
    assert (failure.item, type(failure.exception)) == (3, SystemExit)


def test_route_passes_on_what_one_to_many_and_filter_branches_make(backend: Backend) -> None:
    def twice(n: int) -> list[int]:
        return [n, n]

    def small(n: int) -> bool:
        return n < 7

    # Each branch ends in a one-to-many or filter stage of its own (not a shape
    # of the run's thread), which hands whole roots on in one entry each.
    twice_stage, filter_stage = flat_on(backend, twice), filter_on(backend, small)
    routed = route(is_even, twice_stage, filter_stage)
    for ordered in (True, False):
        run = (routed | on(backend, negate)).run(range(10), ordered=ordered)
        got = [r.unwrap() for r in run]
        expected = [0, 0, -1, -2, -2, -3, -4, -4, -5, -6, -6, -8, -8]
        assert got == expected if ordered else sorted(got) == sorted(expected)
        assert run.statistics().in_flight == 0
    alone = routed.run(range(10))  # the route as the last stage
    assert [r.unwrap() for r in alone] == [0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 8, 8]


def test_the_stages_inside_a_fork_have_statistics(backend: Backend) -> None:
    run = fork(on(backend, length), on(backend, shout) | on(backend, fail_on_x)).run(["ab", "x"])
    list(run)
    by_name = {s.name: s for s in run.statistics().stages}
    fork_name = "fork(length, shout | fail_on_x)"
    assert by_name[f"{fork_name}[0]/length"].items_in == 2
    assert by_name[f"{fork_name}[1]/shout"].succeeded == 2
    assert by_name[f"{fork_name}[1]/fail_on_x"].failed == 1


def test_a_route_is_named_like_its_call() -> None:
    # The branches' own pipes stay readable: the predicate, then, otherwise.
    routed = route(is_even, stage(negate) | stage(plus_one), stage(plus_one) | stage(negate))
    assert routed.name == "route(is_even, negate | plus_one, plus_one | negate)"


class FailingTeardown(StatefulStage[int, int], workers=2):
    def process(self, item: int, /) -> int:
        return item

    def teardown(self) -> None:
        raise RuntimeError("the connection would not close")


class AsyncFailingTeardown(AsyncStatefulStage[int, int], workers=2, backend="task"):
    async def process(self, item: int, /) -> int:
        return item

    async def teardown(self) -> None:
        raise RuntimeError("the connection would not close")


class ExitingTeardown(StatefulStage[int, int], workers=2):
    def process(self, item: int, /) -> int:
        return item

    def teardown(self) -> None:
        sys.exit("the connection would not close")  # logged too, not swallowed


@pytest.mark.parametrize("make", [FailingTeardown, AsyncFailingTeardown, ExitingTeardown])
def test_a_failing_teardown_is_logged_and_the_run_ends_with_every_result(
    make: Callable[[], Stage[int, int]], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("ERROR", logger="typeflow"):
        results = list(make().run(range(10)))
    assert [r.unwrap() for r in results] == list(range(10))
    records = [r for r in caplog.records if r.name == "typeflow"]
    assert records
    assert all("teardown of stage" in r.getMessage() for r in records)
    assert all(r.exc_info and isinstance(r.exc_info[1], RuntimeError | SystemExit) for r in records)
    assert leftovers() == ([], [])
