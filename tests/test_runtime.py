"""Behaviour of runs, on every backend (the ``backend`` fixture parametrizes each test)."""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import re
import sys
import threading
import traceback
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence

import pytest
from returns.result import Failure, Result, Success

from tests.conftest import leftovers, on
from typeflow import (
    AsyncStatefulStage,
    Backend,
    CompositionError,
    DefinitionError,
    RemoteTraceback,
    Run,
    Stage,
    StageError,
    StatefulStage,
    WorkerCrashed,
    current_worker,
    flat_map,
    keep,
    route,
    stage,
)

pytestmark = pytest.mark.timeout(60)


def inc(x: int) -> int:
    return x + 1


def double(x: int) -> int:
    return 2 * x


def reciprocal(x: int) -> float:
    return 1 / x


def halve(x: float) -> float:
    return x / 2


def crash_on_three(x: int) -> int:
    if x == 3:
        os._exit(7)
    return x


def values(results: Iterator[Result[int, StageError]] | list[Result[int, StageError]]) -> list[int]:
    return [r.unwrap() for r in results]


# -- basic runs -------------------------------------------------------------------


def test_single_stage_keeps_input_order(backend: Backend) -> None:
    assert values(on(backend, inc).run(range(500))) == list(range(1, 501))


def test_unordered_yields_every_result_once(backend: Backend) -> None:
    got = values(on(backend, double).run(range(500), ordered=False))
    assert Counter(got) == Counter(2 * x for x in range(500))


@pytest.mark.parametrize("second", ["thread", "process", "task"])
def test_backends_mix_in_one_pipeline(backend: Backend, second: Backend) -> None:
    pipeline = on(backend, inc) | on(second, double) | on("thread", inc)
    assert values(pipeline.run(range(300))) == [2 * (x + 1) + 1 for x in range(300)]


def test_empty_input(backend: Backend) -> None:
    assert list(on(backend, inc).run([])) == []


def test_one_worker_and_tiny_buffers(backend: Backend) -> None:
    pipeline = on(backend, inc, workers=1, buffer=1) | on(backend, double, workers=1, buffer=1)
    assert values(pipeline.run(range(100), window=1)) == [2 * (x + 1) for x in range(100)]


@pytest.mark.parametrize("sync_backend", ["thread", "process"])
def test_async_functions_run_on_thread_and_process_workers(sync_backend: Backend) -> None:
    @stage(workers=2, backend=sync_backend)
    async def slow_square(x: int) -> int:
        await asyncio.sleep(0)
        return x * x

    assert values(slow_square.run(range(50))) == [x * x for x in range(50)]


def test_stage_is_still_a_plain_function() -> None:
    @stage(workers=3, backend="process")
    def parse(text: str) -> int:
        return int(text)

    @stage(backend="task")
    async def fetch(x: int) -> int:
        return x + 1

    assert parse("12") == 12
    assert asyncio.run(fetch(1)) == 2
    assert parse.__name__ == "parse"
    assert parse.name.endswith("parse")


# -- failures ---------------------------------------------------------------------


def test_a_failure_is_a_result_and_the_run_goes_on(backend: Backend) -> None:
    pipeline = on(backend, inc) | on(backend, reciprocal) | on(backend, halve)
    results = list(pipeline.run(range(-3, 3)))
    assert len(results) == 6
    failure = results[2]  # -1 + 1 == 0
    assert isinstance(failure, Failure)
    error = failure.failure()
    assert error.stage.endswith("reciprocal")
    assert error.item == 0
    assert isinstance(error.exception, ZeroDivisionError)
    assert all(isinstance(r, Success) for i, r in enumerate(results) if i != 2)


def test_a_failed_item_skips_later_stages() -> None:
    seen: list[int] = []

    @stage
    def fail_on_odd(x: int) -> int:
        if x % 2:
            raise ValueError(f"odd: {x}")
        return x

    @stage
    def record(x: int) -> int:
        seen.append(x)
        return x

    results = list((fail_on_odd | record).run(range(10)))
    assert sorted(seen) == [0, 2, 4, 6, 8]
    assert [isinstance(r, Failure) for r in results] == [bool(x % 2) for x in range(10)]


def test_process_errors_keep_the_workers_traceback() -> None:
    results = list(on("process", reciprocal).run([0]))
    error = results[0].failure()
    assert isinstance(error.exception, ZeroDivisionError)
    cause = error.exception.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "reciprocal" in cause.text
    text = "".join(traceback.format_exception(error))
    assert "return 1 / x" in text


class Unpicklable(Exception):
    def __init__(self, a: int, b: int) -> None:  # pickling re-creates with one argument
        super().__init__(f"{a}/{b}")


def raise_unpicklable(x: int) -> int:
    raise Unpicklable(x, x)


def test_an_exception_that_does_not_pickle_still_comes_back() -> None:
    error = next(iter(on("process", raise_unpicklable).run([5]))).failure()
    assert "Unpicklable" in str(error.exception)
    assert isinstance(error.exception.__cause__, RemoteTraceback)


def test_an_item_that_does_not_pickle_fails_alone() -> None:
    lock = threading.Lock()
    pipeline = on("process", id)
    results = list(pipeline.run([1, lock, 2]))
    assert isinstance(results[0], Success)
    assert isinstance(results[2], Success)
    error = results[1].failure()
    assert error.item is lock
    assert "cannot be sent to a worker process" in str(error.exception)


def return_unpicklable_every_hundredth(x: int) -> object:
    # Pickles in the worker; does not unpickle in the parent (two required arguments).
    return Unpicklable(x, x) if x % 100 == 1 else x


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("items", [range(1000), [0, 1, 2]])
def test_a_result_that_does_not_unpickle_fails_its_item_alone(
    workers: int, items: Sequence[int]
) -> None:
    # It used to end the pump's thread: lost items (one worker) or a hang (two).
    # A short list: the worker, told to stop after its only batch, is replaced
    # to run the items again alone (it failed them as crashed).
    run = on("process", return_unpicklable_every_hundredth, workers=workers).run(items)
    results = list(run)
    assert len(results) == len(items)
    for x, result in enumerate(results):
        if x % 100 == 1:
            error = result.failure()
            assert error.item == x
            assert isinstance(error.exception, TypeError)
            assert "cannot be received from its worker process" in str(error.exception)
            assert "__reduce__" in str(error.exception)  # the fix
        else:
            assert result.unwrap() == x
    stats = run.statistics()
    failed = sum(1 for x in items if x % 100 == 1)
    assert (stats.succeeded, stats.failed, stats.in_flight) == (len(items) - failed, failed, 0)
    assert stats.stages[0].restarts == 0  # the worker was never in trouble


def test_an_item_that_does_not_unpickle_in_the_worker_fails_alone() -> None:
    odd = Unpicklable(3, 4)  # pickles here, does not unpickle in the worker
    results = list(on("process", repr).run([1, odd, 2]))
    assert [r.unwrap() for r in (results[0], results[2])] == ["1", "2"]
    error = results[1].failure()
    assert error.item is odd
    assert "cannot be received by a worker process" in str(error.exception)


class NoText(Exception):
    """An exception whose ``__str__`` raises (holding a lock, it does not pickle either)."""

    def __init__(self) -> None:
        super().__init__(threading.Lock())

    def __str__(self) -> str:
        raise RuntimeError("no text")


def raise_no_text(x: int) -> int:
    raise NoText


def test_an_exception_whose_str_raises_still_makes_a_readable_failure(backend: Backend) -> None:
    (result,) = on(backend, raise_no_text).run([1])
    error = result.failure()
    assert "str failed" in str(error)
    assert "str failed" in repr(result)  # returns' Failure shows the StageError's str
    assert error.item == 1


def count_up_to_on_processes(n: int) -> list[int]:
    return [r.unwrap() for r in on("process", inc).run(range(n))]


def test_a_process_stage_inside_a_process_worker_is_refused_by_name() -> None:
    (result,) = on("process", count_up_to_on_processes).run([2])
    error = result.failure().exception
    assert isinstance(error, DefinitionError)
    assert "inside a worker process" in str(error)
    assert "backend='thread'" in str(error)
    # On threads the same inner pipeline works.
    (ok,) = on("thread", count_up_to_on_processes).run([2])
    assert ok.unwrap() == [1, 2]


def test_fail_fast_raises_the_first_failure(backend: Backend) -> None:
    with pytest.raises(StageError) as caught:
        for _ in on(backend, reciprocal).run([1, 2, 0, 3], fail_fast=True):
            pass
    assert isinstance(caught.value.exception, ZeroDivisionError)
    assert caught.value.item == 0


def test_values_raise_the_original_exception_and_close_the_run(backend: Backend) -> None:
    assert list(on(backend, reciprocal).run([1, 2, 4]).values()) == [1.0, 0.5, 0.25]
    got: list[float] = []
    with pytest.raises(ZeroDivisionError) as caught:
        got.extend(on(backend, reciprocal).run([1, 2, 0, 3]).values())
    assert got == [1.0, 0.5]
    (note,) = caught.value.__notes__
    assert note.startswith("(typeflow) stage 'reciprocal' failed on item 0: ZeroDivisionError")
    assert leftovers() == ([], [])
    # fail_fast raises the StageError from the run itself: values() still unwraps it.
    with pytest.raises(ZeroDivisionError):
        list(on(backend, reciprocal).run([1, 0, 3], fail_fast=True).values())
    assert leftovers() == ([], [])
    # Leaving the loop early closes the run.
    values = on(backend, reciprocal).run(itertools.count(1)).values()
    assert next(values) == 1.0
    values.close()
    assert leftovers() == ([], [])


def test_values_count_only_what_was_handed_out(backend: Backend) -> None:
    # values() reads the results that are ready without a next() each (the first
    # batch here holds many: the list is in the inbox before the worker starts), but
    # the statistics count only the values the caller has been given, during the
    # loop and after it.
    run = on(backend, reciprocal).run([1, 2, 4, 8] * 50 + [0, 1])
    values = run.values()
    for k in range(1, 6):
        assert next(values) == 1 / 2 ** ((k - 1) % 4)
        assert (run.statistics().succeeded, run.statistics().failed) == (k, 0)
    values.close()
    assert (run.statistics().succeeded, run.statistics().failed) == (5, 0)
    # A failure waiting behind the values is counted once it is raised, not before.
    run = on(backend, reciprocal).run([1, 2, 0, 4] * 50)
    values = run.values()
    assert next(values) == 1.0
    assert (run.statistics().succeeded, run.statistics().failed) == (1, 0)
    values.close()
    assert (run.statistics().succeeded, run.statistics().failed) == (1, 0)
    # The results values() has not handed out are still the run's: another reader
    # gets them, and a run closed under a suspended values() loop ends that loop.
    run = on(backend, reciprocal).run([1, 2, 4, 8] * 5)
    values = run.values()
    assert next(values) == 1.0
    assert [r.unwrap() for r in run] == [0.5, 0.25, 0.125] + [1.0, 0.5, 0.25, 0.125] * 4
    assert list(values) == []
    run = on(backend, reciprocal).run([1, 2, 4, 8] * 50)
    values = run.values()
    assert next(values) == 1.0
    run.close()
    assert list(values) == []
    assert (run.statistics().succeeded, run.statistics().failed) == (1, 0)
    # The values before a failure are handed out, the failure raised, nothing after it.
    run = on(backend, reciprocal).run([1, 2, 0, 4, 8])
    got: list[float] = []
    with pytest.raises(ZeroDivisionError):
        got.extend(run.values())
    assert got == [1.0, 0.5]
    stats = run.statistics()
    assert (stats.succeeded, stats.failed) == (2, 1)
    # consume() takes them at once too, and keeps every failure, in order.
    run = on(backend, reciprocal).run([0, 1, 0, 2, 0, 4] * 20)
    failures = run.consume()
    assert len(failures) == 60
    assert all(isinstance(f.exception, ZeroDivisionError) for f in failures)
    assert (run.statistics().succeeded, run.statistics().failed) == (60, 60)
    assert leftovers() == ([], [])


OUT_OF_RANGE = ValueError("out of range")  # one instance, raised for every item


def refuse_above_two(x: int) -> int:
    if x > 2:
        raise OUT_OF_RANGE
    return x


def test_one_exception_raised_for_several_items_names_the_latest() -> None:
    refuse = stage(refuse_above_two)
    for first_bad in (3, 5):
        with pytest.raises(ValueError, match="out of range") as caught:
            list(refuse.run([1, first_bad, 2]).values())
        assert caught.value is OUT_OF_RANGE
        (note,) = caught.value.__notes__
        assert f"failed on item {first_bad}:" in note


def inner_refuses(x: int) -> int:
    (value,) = stage(refuse_above_two).run([x]).values()
    return value


def test_a_nested_run_s_note_stays_under_the_outer_stage_s() -> None:
    with pytest.raises(ValueError, match="out of range") as caught:
        list(stage(inner_refuses).run([1, 7]).values())
    inner, outer = caught.value.__notes__
    assert inner.startswith("(typeflow) stage 'refuse_above_two' failed on item 7:")
    assert outer.startswith("(typeflow) stage 'inner_refuses' failed on item 7:")


def test_async_values_raise_the_original_exception(backend: Backend) -> None:
    got: list[float] = []

    async def main() -> None:
        async with on(backend, reciprocal).arun([1, 2, 0, 3]) as run:
            async for value in run.values():
                got.append(value)

    with pytest.raises(ZeroDivisionError, match="division by zero"):
        asyncio.run(main())
    assert got == [1.0, 0.5]
    assert leftovers() == ([], [])


def where_am_i(x: int) -> tuple[str, int, int, str]:
    worker = current_worker()
    assert worker is not None
    return (worker.stage, worker.index, worker.workers, worker.backend)


class Tagged(StatefulStage[int, str], workers=2):
    def setup(self) -> None:
        worker = current_worker()
        assert worker is not None
        self.tag = f"{worker.stage}:{worker.index}"

    def process(self, item: int, /) -> str:
        return self.tag


async def checked(x: int) -> int:
    await asyncio.sleep(0)
    if x == 2:
        raise ValueError("two")
    if x == 3:
        raise asyncio.CancelledError  # its own: fails the item, not the worker
    return x


async def tenfold(x: int) -> int:
    await asyncio.sleep(0)
    return 10 * x


@pytest.mark.parametrize("ordered", [True, False])
def test_task_items_one_at_a_time_keep_every_outcome(ordered: bool) -> None:
    # One item in a feed at a time: each task worker takes a batch of one, which
    # goes a shorter way than a batch (a value passed on without an outcome).
    pipeline = stage(workers=4, backend="task")(checked) | stage(workers=4, backend="task")(tenfold)
    outcomes: list[object] = []
    with pipeline.feed(ordered=ordered) as feed:
        results = iter(feed)
        for x in range(6):
            feed.put(x)
            result = next(results)
            if isinstance(result, Failure):
                error = result.failure()
                assert (error.stage, error.item) == ("checked", x)
                frames = traceback.extract_tb(error.exception.__traceback__)
                assert "checked" in [frame.name for frame in frames]
                outcomes.append(type(error.exception))
            else:
                outcomes.append(result.unwrap())
        feed.close()
        assert list(results) == []
    assert outcomes == [0, 10, ValueError, asyncio.CancelledError, 40, 50]
    first, second = feed.run.statistics().stages
    assert (first.succeeded, first.failed, second.succeeded) == (4, 2, 4)


#: The threads ``in_a_thread``'s calls ran in.
TO_THREAD_THREADS: set[threading.Thread] = set()


def inc_noting_the_thread(x: int) -> int:
    TO_THREAD_THREADS.add(threading.current_thread())
    return x + 1


async def in_a_thread(x: int) -> int:
    return await asyncio.to_thread(inc_noting_the_thread, x)


def test_the_threads_of_asyncio_to_thread_are_the_run_s_and_end_after_it() -> None:
    TO_THREAD_THREADS.clear()
    assert sorted(values(stage(workers=4, backend="task")(in_a_thread).run(range(20)))) == list(
        range(1, 21)
    )
    # Noted as they ran: once the run's loop has closed they end, maybe already.
    assert TO_THREAD_THREADS
    assert all(t.name.startswith("typeflow:to_thread") for t in TO_THREAD_THREADS)
    for thread in TO_THREAD_THREADS:
        thread.join(10)  # idle: told to end when the run's loop closed
    assert [t.name for t in TO_THREAD_THREADS if t.is_alive()] == []


def test_closing_a_run_does_not_wait_for_a_call_in_asyncio_to_thread() -> None:
    began, release = threading.Event(), threading.Event()

    def held(x: int) -> int:
        began.set()
        release.wait(30)
        return x

    async def hold(x: int) -> int:
        return await asyncio.to_thread(held, x)

    run = stage(backend="task")(hold).run(itertools.count())
    run.start()
    assert began.wait(10)
    run.close()  # returns while the call is still held (it cannot be interrupted)
    assert not release.is_set()
    assert [t.name for t in threading.enumerate() if t.name == "typeflow:loop"] == []
    release.set()  # the call returns: its thread ends (joined by the check after the test)


def test_a_stage_knows_which_of_its_workers_runs_it(backend: Backend) -> None:
    seen = {r.unwrap() for r in on(backend, where_am_i, workers=3).run(range(200))}
    assert {(name, workers, kind) for name, _, workers, kind in seen} == {
        ("where_am_i", 3, backend)
    }
    assert {index for _, index, _, _ in seen} <= {0, 1, 2}
    assert current_worker() is None  # outside any worker
    assert where_am_i.__name__ == "where_am_i"
    with pytest.raises(AssertionError):
        where_am_i(1)  # called directly: no worker
    tags = {r.unwrap() for r in Tagged().run(range(50))}
    assert tags <= {"Tagged:0", "Tagged:1"}


class _Cycle:
    """Something that refers to itself (a request object, say), holding a run."""

    def __init__(self, run: Run[int]) -> None:
        self.me = self
        self.run = run


def test_a_run_collected_in_one_of_its_own_threads_still_shuts_down() -> None:
    # A run dropped inside a reference cycle is closed by the garbage collector,
    # in whichever thread allocates: one of its own workers could not join itself,
    # and the run's event loop thread and its file descriptors leaked for good.
    dropped = threading.Event()
    collected = threading.Event()

    def collect_once(n: int) -> int:
        if dropped.is_set() and not collected.is_set():
            collected.set()
            gc.collect()
        return n

    gc.disable()
    try:
        cycle = _Cycle((stage(workers=2)(collect_once) | on("task", inc)).run(itertools.count()))
        next(cycle.run)
        del cycle
        dropped.set()
        assert collected.wait(10)
    finally:
        gc.enable()
    assert leftovers(10.0) == ([], [])


def test_a_crashed_process_worker_fails_only_its_item_and_is_replaced() -> None:
    results = list(on("process", crash_on_three, workers=2).run(range(8)))
    assert len(results) == 8
    error = results[3].failure()
    assert isinstance(error.exception, WorkerCrashed)
    assert error.exception.exitcode == 7
    assert [r.unwrap() for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5, 6, 7]


# -- input, laziness, ending ------------------------------------------------------


def test_input_is_read_lazily_and_memory_stays_bounded(backend: Backend) -> None:
    pulled = 0

    def endless() -> Iterator[int]:
        nonlocal pulled
        for i in itertools.count():
            pulled = i + 1
            yield i

    window = 64
    run = on(backend, inc).run(endless(), window=window)
    got: list[int] = []
    for result in itertools.islice(run, 200):
        got.append(result.unwrap())
        # Read but not yet yielded: at most the window (and the one item a feeder
        # holds while it waits for a place), whatever the timing.
        assert pulled - len(got) <= window + 1
    run.close()
    assert got == list(range(1, 201))


def test_break_from_an_endless_input_stops_every_worker(backend: Backend) -> None:
    pipeline = on(backend, inc, workers=3) | on(backend, double, workers=2)
    for result in pipeline.run(itertools.count()):
        if result.unwrap() > 100:
            break
    threads, procs = leftovers()
    assert not threads
    assert not procs


def test_close_and_context_manager_stop_the_run(backend: Backend) -> None:
    with on(backend, inc).run(itertools.count()) as results:
        assert next(results).unwrap() == 1
    assert leftovers() == ([], [])
    run = on(backend, inc).run(itertools.count())
    next(run)
    run.close()
    assert list(run) == []


class _Numbers:
    """An endless input that a weak reference can watch."""

    def __init__(self) -> None:
        self.n = 0

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        self.n += 1
        return self.n


class _ManyNumbers(list[int]):
    """A list too long to go in at once (a feeder reads it in chunks) that a weak
    reference can watch."""


async def _numbers_forever() -> AsyncIterator[int]:
    for i in itertools.count():
        yield i


def _endless_source(shape: str) -> Iterable[int] | AsyncIterator[int]:
    if shape == "iterator":
        return _Numbers()
    if shape == "list":
        return _ManyNumbers(range(100_000))
    return _numbers_forever()


@pytest.mark.parametrize("shape", ["iterator", "list", "async iterator"])
def test_a_run_closed_early_lets_go_of_its_input_at_once(backend: Backend, shape: str) -> None:
    # Not only once the garbage collector runs: on Python 3.12+ the feeder's frames,
    # and so its input, stayed in a reference cycle (an exception swallowed by a
    # generator-based context manager), and a merged stream read on until then.
    source = _endless_source(shape)
    watch = weakref.ref(source)
    gc.disable()
    try:
        assert len(on(backend, inc).run(source).take(5)) == 5
        del source
        assert watch() is None
    finally:
        gc.enable()


class _Tracked:
    """An item that a weak reference can watch."""

    def __init__(self, n: int) -> None:
        self.n = n


def _fails_every_seventh(item: _Tracked) -> _Tracked:
    if item.n % 7 == 3:
        raise ValueError(item.n)
    return item


async def _afails_every_seventh(item: _Tracked) -> _Tracked:
    return _fails_every_seventh(item)


def _same(item: _Tracked) -> _Tracked:
    return item


async def _asame(item: _Tracked) -> _Tracked:
    return item


def _is_kept(item: _Tracked) -> bool:
    return _fails_every_seventh(item).n >= 0


async def _ais_kept(item: _Tracked) -> bool:
    return _is_kept(item)


async def _aslow_every_seventh(item: _Tracked) -> _Tracked:
    if item.n % 7 == 3:
        await asyncio.sleep(60)  # past the stage's timeout: cancelled
    return item


def _as_pair(item: _Tracked) -> list[_Tracked]:
    return [_fails_every_seventh(item)]


async def _aas_pair(item: _Tracked) -> AsyncIterator[_Tracked]:
    yield _fails_every_seventh(item)


def _failing_stage(backend: Backend, variant: str) -> Stage[_Tracked, _Tracked]:
    """A stage of ``variant`` whose call fails on every seventh item."""
    if backend == "task":
        return _failing_task_stage(variant)
    if variant == "stateful":

        class Fails(StatefulStage[_Tracked, _Tracked], workers=2, backend=backend):
            def process(self, item: _Tracked, /) -> _Tracked:
                return _fails_every_seventh(item)

        return Fails()
    if variant == "flat":
        return flat_map(workers=2, backend=backend)(_as_pair)
    if variant == "keep":
        return keep(_is_kept, workers=2, backend=backend)
    if variant == "route":
        return route(_is_kept, stage(backend=backend)(_same), stage(backend=backend)(_same))
    if variant == "timeout fires":
        return stage(workers=2, backend=backend, timeout=0.01)(_aslow_every_seventh)
    if variant == "async on a thread":
        return stage(workers=2, backend=backend)(_afails_every_seventh)
    if variant == "retries":
        return stage(workers=2, backend=backend, retries=1, backoff=0.0001)(_fails_every_seventh)
    if variant == "timeout":
        return stage(workers=2, backend=backend, timeout=60.0)(_fails_every_seventh)
    assert variant == "plain"
    return stage(workers=2, backend=backend)(_fails_every_seventh)


def _failing_task_stage(variant: str) -> Stage[_Tracked, _Tracked]:
    if variant == "stateful":

        class AsyncFails(AsyncStatefulStage[_Tracked, _Tracked], workers=2, backend="task"):
            async def process(self, item: _Tracked, /) -> _Tracked:
                return _fails_every_seventh(item)

        return AsyncFails()
    if variant == "flat":
        return flat_map(workers=2, backend="task")(_aas_pair)
    if variant == "keep":
        return keep(_ais_kept, workers=2, backend="task")
    if variant == "route":
        return route(_is_kept, stage(backend="task")(_asame), stage(backend="task")(_asame))
    if variant == "timeout fires":
        return stage(workers=2, backend="task", timeout=0.01)(_aslow_every_seventh)
    if variant == "retries":
        return stage(workers=2, backend="task", retries=1, backoff=0.0001)(_afails_every_seventh)
    if variant == "timeout":
        return stage(workers=2, backend="task", timeout=60.0)(_afails_every_seventh)
    assert variant == "plain"
    return stage(workers=2, backend="task")(_afails_every_seventh)


@pytest.mark.parametrize(
    "variant",
    [
        "plain",
        "retries",
        "timeout",
        "stateful",
        "flat",
        "keep",
        "route",
        "async on a thread",
        "timeout fires",
    ],
)
def test_failed_batches_are_freed_without_the_garbage_collector(
    backend: Backend, variant: str
) -> None:
    # A failure's traceback held the worker's frames that had called the stage's
    # function, which held the batch and its outcome, the failure among them: a
    # reference cycle per failed batch, so every item of such a batch stayed alive
    # until the collector ran, though the caller had dropped every result.
    if variant == "async on a thread" and backend == "task":
        pytest.skip("a task stage's function is async already")
    made: list[weakref.ref[_Tracked]] = []

    def tracked() -> Iterator[_Tracked]:
        for n in itertools.count():
            item = _Tracked(n)
            made.append(weakref.ref(item))
            yield item

    window, n = 64, 800 if variant == "timeout fires" else 1500
    gc.disable()
    try:
        with _failing_stage(backend, variant).run(tracked(), window=window) as run:
            failed = sum(isinstance(r, Failure) for r in itertools.islice(run, n))
            alive = sum(ref() is not None for ref in made)
    finally:
        gc.enable()
    assert failed == sum(i % 7 == 3 for i in range(n))
    # In flight: the window, and the batches the workers hold.
    assert alive <= 4 * window


def test_no_item_outlives_a_finished_run_whose_results_were_dropped(backend: Backend) -> None:
    # A worker's loop held its last batch's outcome, failures included, in a frame
    # that the failures' tracebacks held: a cycle that outlived the run.
    made: list[weakref.ref[_Tracked]] = []

    def tracked() -> Iterator[_Tracked]:
        for n in range(3000):
            item = _Tracked(n)
            made.append(weakref.ref(item))
            yield item

    fn = _afails_every_seventh if backend == "task" else _fails_every_seventh
    gc.disable()
    try:
        results = list(stage(workers=4, backend=backend)(fn).run(tracked()))
        assert sum(isinstance(r, Failure) for r in results) == sum(n % 7 == 3 for n in range(3000))
        del results
        alive = sum(ref() is not None for ref in made)
    finally:
        gc.enable()
    assert alive == 0


_SHARED_ERROR = ValueError("one exception object for every failure")


async def _fails_with_one_shared_error(n: int) -> int:
    await asyncio.sleep(0)  # other items' calls run in between, in each worker
    if n % 3 == 0:
        raise _SHARED_ERROR
    await asyncio.sleep(0)
    return n


@pytest.mark.parametrize("backend", ["thread", "task"])
def test_one_exception_object_raised_by_many_calls_fails_only_them(backend: Backend) -> None:
    # Each raise gives the shared object a new traceback, another batch's by the
    # time an earlier failure's frames were released: on Python 3.12 the frames
    # it led to were another worker's batch, suspended, which clearing closed
    # (its items failed with GeneratorExit and RuntimeError).
    results = list(stage(workers=4, backend=backend)(_fails_with_one_shared_error).run(range(6000)))
    failed = [r.failure().exception for r in results if isinstance(r, Failure)]
    assert all(e is _SHARED_ERROR for e in failed)
    assert len(failed) == 2000
    assert [r.unwrap() for r in results if isinstance(r, Success)] == [
        n for n in range(6000) if n % 3
    ]


class _CountsItsItems(StatefulStage[int, int], workers=1, backend="process"):
    """Counts, in its worker process with no garbage collector, the objects made
    for its calls that are still alive; every seventh call fails."""

    def setup(self) -> None:
        gc.disable()
        self.made: list[weakref.ref[_Tracked]] = []

    def process(self, n: int, /) -> int:
        item = _Tracked(n)
        self.made = [ref for ref in self.made if ref() is not None]
        self.made.append(weakref.ref(item))
        _fails_every_seventh(item)
        return len(self.made)


def test_failed_batches_are_freed_in_a_worker_process_too() -> None:
    # The worker process's outcome held the same cycle until its collector ran.
    alive = [r.unwrap() for r in _CountsItsItems().run(range(3000)) if isinstance(r, Success)]
    # Alive at a call: those of the failures of the batch in progress (a batch
    # holds up to BATCH_LIMIT items), not those of every batch before.
    assert max(alive[-100:]) <= 1024 // 7 + 2


def test_an_error_in_the_input_ends_the_run_after_the_items_before_it(backend: Backend) -> None:
    def broken() -> Iterator[int]:
        yield from range(5)
        raise OSError("disk on fire")

    got: list[int] = []

    def consume() -> None:
        for r in on(backend, inc).run(broken()):
            got.append(r.unwrap())

    with pytest.raises(OSError, match="disk on fire"):
        consume()
    assert got == [1, 2, 3, 4, 5]


def test_keyboard_interrupt_while_waiting_stops_everything(backend: Backend) -> None:
    import _thread

    def interrupt_at_50(x: int) -> int:
        if x == 50:
            _thread.interrupt_main()
        return x

    first = on("thread", interrupt_at_50, workers=1)
    pipeline = first | on(backend, inc)
    with pytest.raises(KeyboardInterrupt):
        for _ in pipeline.run(itertools.count()):
            pass
    assert leftovers() == ([], [])


# -- async ------------------------------------------------------------------------


def test_arun_inside_an_event_loop(backend: Backend) -> None:
    async def numbers() -> AsyncIterator[int]:
        for i in range(100):
            await asyncio.sleep(0)
            yield i

    async def main() -> tuple[list[int], list[int]]:
        stage_ = on(backend, double)
        from_async = [r.unwrap() async for r in stage_.arun(numbers())]
        from_sync = [r.unwrap() async for r in stage_.arun(range(10))]
        return from_async, from_sync

    from_async, from_sync = asyncio.run(main())
    assert from_async == [2 * x for x in range(100)]
    assert from_sync == [2 * x for x in range(10)]


def test_arun_closed_early(backend: Backend) -> None:
    async def main() -> int:
        async with on(backend, inc).arun(itertools.count()) as results:
            async for r in results:
                if r.unwrap() >= 10:
                    return r.unwrap()
        raise AssertionError("unreachable")

    assert asyncio.run(main()) == 10


def test_run_accepts_an_async_iterable(backend: Backend) -> None:
    async def numbers() -> AsyncIterator[int]:
        for i in range(20):
            yield i

    assert values(on(backend, inc).run(numbers())) == list(range(1, 21))


# -- definitions are checked early -------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"workers": 0}, "workers=0"),
        ({"buffer": 0}, "buffer=0"),
        ({"backend": "gpu"}, "backend='gpu'"),
        ({"name": ""}, "non-empty"),
        ({"retry_on": (ValueError, 3)}, r"retry_on=\(<class 'ValueError'>, 3\)"),
        ({"retry_on": (SystemExit,)}, "SystemExit is not an Exception"),
        ({"retry_on": (asyncio.CancelledError,)}, "CancelledError is not an Exception"),
    ],
)
def test_bad_options_are_refused_at_decoration(options: dict[str, object], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        stage(**options)  # type: ignore[call-overload] # untyped callers are what this checks


def test_a_plain_function_on_the_task_backend_is_refused() -> None:
    with pytest.raises(DefinitionError, match="async def"):
        stage(backend="task")(inc)  # type: ignore[arg-type] # the static error is tested in tests/typing


def test_generators_and_wrong_arity_are_refused() -> None:
    def gen(x: int) -> Iterator[int]:
        yield x

    def two(x: int, y: int) -> int:
        return x + y

    with pytest.raises(DefinitionError, match="generator function"):
        stage(gen)
    with pytest.raises(DefinitionError, match="one required positional parameter"):
        stage(two)  # type: ignore[arg-type] # the static error is tested in tests/typing


def test_process_stages_ship_lambdas_and_closures() -> None:
    offset = 10
    add_offset: Callable[[int], int] = lambda x: x + offset  # noqa: E731 - a lambda on purpose
    shifted = stage(workers=2, backend="process")(add_offset)
    assert values(shifted.run(range(5))) == [10, 11, 12, 13, 14]


def test_an_unshippable_process_function_is_refused_at_decoration() -> None:
    lock = threading.Lock()

    def locked(x: int) -> int:
        with lock:
            return x

    with pytest.raises(DefinitionError, match=r"locked.*cannot be pickled"):
        stage(backend="process")(locked)


def test_composition_forms_and_runtime_check() -> None:
    a, b, c = stage(inc), stage(double), stage(inc)
    for pipeline in ((a | b) | c, a | (b | c), (a | b) | (c | stage(double))):
        assert values(pipeline.run([1]))[0] in (5, 10)
    assert len((a | b) | (c | b)) == 4

    @stage
    def text(x: int) -> str:
        return str(x)

    with pytest.raises(CompositionError, match=r"produces str but .* accepts int"):
        text | b  # type: ignore[operator] # the run-time check for untyped code
    with pytest.raises(CompositionError, match="must be a stage"):
        a | inc  # type: ignore[operator] # a plain function on the right
    with pytest.raises(CompositionError, match=r"left side of \| must be a stage"):
        inc | a  # type: ignore[operator] # a plain function on the left


def test_the_runtime_check_applies_the_numeric_promotions_as_the_checkers_do() -> None:
    def is_odd(x: int) -> bool:
        return x % 2 == 1

    def weigh(x: float) -> str:
        return f"{x:.1f}"

    def rotate(x: complex) -> complex:
        return x * 1j

    # bool is an int, and an int is accepted as a float or a complex (PEP 484).
    assert [r.unwrap() for r in (stage(is_odd) | stage(weigh)).run([1, 2])] == ["1.0", "0.0"]
    assert [r.unwrap() for r in (stage(is_odd) | stage(rotate)).run([1])] == [1j]
    assert [r.unwrap() for r in (stage(inc) | stage(weigh)).run([1])] == ["2.0"]


async def is_even_remotely(n: int) -> bool:
    await asyncio.sleep(0)
    return n % 2 == 0


class Service:
    """A client object whose calls are awaited."""

    async def __call__(self, n: int) -> int:
        await asyncio.sleep(0)
        return 10 * n


@pytest.mark.parametrize("backend", ["thread", "task"])
def test_an_object_with_an_async_call_is_an_async_stage(backend: Backend) -> None:
    remote = stage(backend=backend)(Service())
    assert [r.unwrap() for r in remote.run([1, 2])] == [10, 20]


def test_a_function_that_returns_a_coroutine_without_being_async_fails_clearly(
    recwarn: pytest.WarningsRecorder,
) -> None:
    # The checkers take these for async stages; typeflow cannot tell until the first
    # call.  Nothing is passed on unawaited, kept or routed by an always-true verdict.
    mapped = stage(inc).map(lambda n: is_even_remotely(n))
    kept = stage(inc).keep(lambda n: is_even_remotely(n))
    routed = route(lambda n: is_even_remotely(n), stage(inc), stage(double))
    for pipeline in (mapped, kept, routed):
        (result,) = pipeline.run([1])
        error = result.failure().exception
        assert isinstance(error, TypeError)
        assert "returned a coroutine" in str(error)
        assert "async def" in str(error)
    assert not [w for w in recwarn if "never awaited" in str(w.message)]
    # A plain function is vetted by its first call, then called directly.
    assert [r.unwrap() for r in stage(inc).keep(lambda n: n > 2).run([1, 2, 3])] == [3, 4]


def test_window_must_be_positive() -> None:
    with pytest.raises(DefinitionError, match="window=0"):
        stage(inc).run([1], window=0)


def test_the_fast_success_is_a_true_success() -> None:
    # The collector builds Success objects without returns' constructor (half the
    # cost per item); this pins that shortcut to what the constructor makes.
    from typeflow._runtime import _run

    value = object()
    made: Result[object, StageError] = _run._success(value)  # pyright: ignore[reportPrivateUsage] - the fast path under test
    made_type: type = type(made)
    assert made_type is Success
    assert made == Success(value)
    assert made.unwrap() is value
    assert made.map(id) == Success(id(value))
    assert str(made) == str(Success(value))


def increment(x: int) -> int:
    return x + 1


def as_range(xs: list[int]) -> Sequence[int]:
    return range(len(xs))


IN_MEMORY: list[Callable[[list[int]], Sequence[int]]] = [list, tuple, as_range]


@pytest.mark.parametrize("make", IN_MEMORY, ids=["list", "tuple", "range"])
def test_in_memory_inputs_are_fed_in_chunks_with_exact_accounting(
    backend: Backend, make: Callable[[list[int]], Sequence[int]]
) -> None:
    # More items than the window, a window that is not a multiple of the chunk:
    # the feeder gives back the places it took and did not use.
    items = make(list(range(3000)))
    run = on(backend, increment).run(items, window=100)
    assert [r.unwrap() for r in run] == [x + 1 for x in items]
    stats = run.statistics()
    assert stats.items_read == stats.done == 3000
    assert stats.in_flight == 0


def _thread_names(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the threads started from now on, in order."""
    names: list[str] = []
    start = threading.Thread.start

    def recording(self: threading.Thread) -> None:
        names.append(self.name)
        start(self)

    monkeypatch.setattr(threading.Thread, "start", recording)
    return names


@pytest.mark.parametrize("make", IN_MEMORY, ids=["list", "tuple", "range"])
def test_a_short_input_in_memory_goes_in_from_the_caller_s_thread(
    backend: Backend, make: Callable[[list[int]], Sequence[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    started = _thread_names(monkeypatch)
    items = make(list(range(16)))  # as many as the first buffer holds
    run = on(backend, increment, buffer=16).run(items)
    assert [r.unwrap() for r in run] == [x + 1 for x in items]
    assert "typeflow:feeder" not in started
    stats = run.statistics()
    assert stats.items_read == stats.done == 16
    assert stats.in_flight == 0


@pytest.mark.parametrize(
    ("make", "window"),
    [
        (lambda: list(range(17)), None),
        (lambda: list(range(10)), 4),
        (lambda: iter(range(10)), None),
    ],
    ids=["longer than the buffer", "longer than the window", "an iterator"],
)
def test_an_input_that_does_not_fit_or_is_not_in_memory_has_a_feeder(
    backend: Backend,
    make: Callable[[], Iterable[int]],
    window: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = _thread_names(monkeypatch)
    items = list(make())
    run = on(backend, increment, buffer=16).run(make(), window=window)
    assert [r.unwrap() for r in run] == [x + 1 for x in items]
    assert "typeflow:feeder" in started


def test_a_heavy_chunk_respects_the_byte_budget_of_a_process_stage() -> None:
    from typeflow._runtime._channel import Channel

    channel: Channel[tuple[int, bytes]] = Channel(1000, max_bytes=1 << 20)
    big = [(i, bytes(200 << 10)) for i in range(8)]  # 1.6 MiB in all: over an eighth
    done = threading.Event()

    def put() -> None:
        channel.put_chunk(big)
        done.set()

    threading.Thread(target=put, daemon=True).start()
    taken: list[int] = []
    while len(taken) < 8:
        taken += [key for key, _ in channel.get_many(100)]
        assert len(channel) <= 6  # one item at a time: the budget holds
    assert done.wait(5)
    assert taken == list(range(8))


def test_a_stage_of_many_threads_starts_them_while_the_first_ones_work() -> None:
    # Beyond the first few, a launcher thread starts the workers: every item is
    # still processed, and a run closed while it launches leaves no thread behind.
    many = stage(workers=40)(increment)
    assert [r.unwrap() for r in many.run(range(500))] == list(range(1, 501))
    run = many.run(itertools.count())
    assert [r.unwrap() for r in run.take(3)] == [1, 2, 3]
    assert leftovers() == ([], [])


def pair(x: int) -> list[int]:
    return [x, x]


def positive(x: int) -> bool:
    return x > 0


def workers_started(pipeline: Stage[int, int], items: Iterable[int]) -> int:
    """How many worker threads of the stage named ``inc`` a run of ``items`` starts
    (each new thread reports itself once, through ``threading.setprofile``)."""
    names: list[str] = []

    def first_event(*_: object) -> None:
        names.append(threading.current_thread().name)
        sys.setprofile(None)

    threading.setprofile(first_event)
    try:
        list(pipeline.run(items))
    finally:
        threading.setprofile(None)
    return len([name for name in names if re.fullmatch(r"typeflow:inc:\d+", name)])


def test_a_short_input_in_memory_starts_no_more_workers_than_it_has_items() -> None:
    eight = stage(workers=8)(inc)
    assert workers_started(eight, [0, 1]) == 2
    assert workers_started(eight, (0, 1, 2)) == 3
    assert workers_started(eight, range(0)) == 1
    assert workers_started(eight, range(20)) == 8
    # A map or a filter before it keeps the bound; a one-to-many stage does not.
    assert workers_started(stage(double) | keep(positive) | eight, [0, 1]) == 2
    assert workers_started(flat_map(pair) | eight, [0]) == 8
    # Any other input may be longer than it looks: every worker starts.
    assert workers_started(eight, iter([0])) == 8
    # What counts is what iterating gives, not len().
    assert workers_started(eight, Paged([0, 1])) == 5
    # An input too long to go in at once is read while the run goes on (a list
    # may grow meanwhile): every worker starts.
    assert workers_started(stage(workers=8, buffer=2)(inc), [0, 1, 2]) == 8


class Paged(list[int]):
    """A list whose iteration fetches more pages than ``len()`` counts."""

    def __init__(self, items: Iterable[int]) -> None:
        super().__init__(items)
        self.reads = 0

    def __iter__(self) -> Iterator[int]:
        self.reads += 1
        yield from super().__iter__()
        yield from range(100, 103)


@pytest.mark.parametrize("buffer", [64, 2])
def test_an_input_in_memory_is_read_once(buffer: int) -> None:
    # Short enough to go in at once or not (buffer=2: a feeder reads it), its
    # pages are fetched once, and every item they hold is processed.
    paged = Paged([0, 1])
    assert values(stage(workers=2, buffer=buffer)(inc).run(paged)) == [1, 2, 101, 102, 103]
    assert paged.reads == 1


@pytest.mark.parametrize("items", [None, 42, 3.5])
def test_run_refuses_an_input_that_is_not_iterable_at_once(items: object) -> None:
    with pytest.raises(TypeError, match=rf"run\(\) needs an iterable of items, not {items!r}"):
        on("thread", increment).run(items)  # type: ignore[arg-type] # the point of the test
    with pytest.raises(TypeError, match="needs an iterable"):
        on("thread", increment).arun(items)  # type: ignore[arg-type] # the point of the test


@pytest.mark.parametrize(("items", "unit"), [("42", "character"), (b"ab", "byte")])
def test_run_refuses_one_string_which_would_be_read_as_many_items(
    items: str | bytes, unit: str
) -> None:
    # A str is an iterable of str: the type checkers accept it where a list is meant.
    shout = stage(str.upper)
    for start in (shout.run, shout.arun):
        with pytest.raises(TypeError, match=rf"read {unit} by {unit} as 2 items; pass a list"):
            start(items)  # type: ignore[arg-type] # bytes: the point of the test


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"window": "x"}, "window='x'"),
        ({"window": 2.5}, "window=2.5"),
        ({"ordered": "no"}, "ordered='no'"),
        ({"fail_fast": 1}, "fail_fast=1"),
        ({"handle_signals": None}, "handle_signals=None"),
        ({"grace": -1}, "grace=-1"),
        ({"grace": float("nan")}, "grace=nan"),
    ],
)
def test_run_refuses_bad_options_by_name(options: dict[str, object], named: str) -> None:
    with pytest.raises(DefinitionError, match=re.escape(named)):
        on("thread", increment).run([1], **options)  # type: ignore[arg-type] # the point of the test


@pytest.mark.parametrize("n", [-1, 1.5, "x", True])
def test_take_refuses_a_count_that_is_not_a_whole_number(n: object) -> None:
    run = on("thread", increment).run([1, 2])
    with pytest.raises(ValueError, match=re.escape(f"not {n!r}")):
        run.take(n)  # type: ignore[arg-type] # the point of the test
    assert run.take(1) == [Success(2)]  # the run was left as it was
