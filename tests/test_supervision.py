"""Timeouts, retries, crashed workers, fail-fast and statistics, on every backend."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest
from returns.result import Failure, Result, Success

from tests.conftest import leftovers, on, worker_pids
from typeflow import (
    Backend,
    DefinitionError,
    Stage,
    StageError,
    StageTimeout,
    StatefulStage,
    WorkerCrashed,
    stage,
)

pytestmark = pytest.mark.timeout(120)


def sleepy(x: int) -> int:
    """Slow on multiples of 10: 2 s, far beyond the tests' timeouts."""
    if x % 10 == 0:
        time.sleep(2.0)
    return x


def make_flaky(fail_times: int) -> Callable[[int], int]:
    """A function that fails the first ``fail_times`` calls with each odd item."""
    calls: dict[int, int] = {}

    def flaky(x: int) -> int:
        calls[x] = calls.get(x, 0) + 1
        if x % 2 and calls[x] <= fail_times:
            raise ConnectionError(f"flaky {x}, call {calls[x]}")
        return x

    return flaky


def crash_once(marker_dir: str) -> Callable[[int], int]:
    """A function whose worker dies the first time it sees item 3 (the next worker survives)."""

    def crashing(x: int) -> int:
        marker = Path(marker_dir) / f"{x}.seen"
        if x == 3 and not marker.exists():
            marker.touch()
            os._exit(9)
        return x

    return crashing


async def asleepy(x: int) -> int:
    if x % 10 == 0:
        await asyncio.sleep(2.0)
    return x


def timed(backend: Backend, timeout: float) -> Stage[int, int]:
    if backend == "task":
        return stage(backend="task", workers=2, timeout=timeout)(asleepy)
    return stage(backend=backend, workers=2, timeout=timeout)(sleepy)


def test_a_call_past_its_timeout_fails_and_the_run_goes_on(backend: Backend) -> None:
    started = time.monotonic()
    run = timed(backend, 0.2).run(range(1, 15))
    results = list(run)
    assert time.monotonic() - started < 1.8  # the 2 s call was not waited for
    assert [r.unwrap() for i, r in enumerate(results) if i != 9] == [
        x for x in range(1, 15) if x != 10
    ]
    error = results[9].failure()
    assert isinstance(error.exception, StageTimeout)
    assert isinstance(error.exception, TimeoutError)
    assert error.item == 10
    stats = run.statistics().stages[0]
    assert stats.timed_out == 1
    assert stats.failed == 1
    assert stats.restarts == (0 if backend == "task" else 1)


def slow_at_100_and_101(x: int) -> int:
    """Quick, except items 100 and 101: 0.3 s each."""
    if x in (100, 101):
        time.sleep(0.3)
    return x


async def aslow_at_100_and_101(x: int) -> int:
    if x in (100, 101):
        await asyncio.sleep(0.3)
    return x


def test_a_timeout_counts_from_when_the_worker_begins_the_item(backend: Backend) -> None:
    # Quick items first, so that 100 and 101 travel in one batch (or, on processes,
    # 101 waits behind 100 in the worker's socket): 101 waits 0.3 s for 100, and
    # must still have its full 0.5 s once the worker begins it.
    timed: Stage[int, int]
    if backend == "task":
        timed = stage(backend="task", workers=1, timeout=0.5)(aslow_at_100_and_101)
    else:
        timed = stage(backend=backend, workers=1, timeout=0.5)(slow_at_100_and_101)
    run = timed.run(range(150))
    results = list(run)
    assert [r.unwrap() for r in results] == list(range(150))
    stats = run.statistics().stages[0]
    assert (stats.timed_out, stats.restarts) == (0, 0)  # no worker was killed


def counting_calls(marker_dir: str, hang_on: int) -> Callable[[int], int]:
    """Leaves a file per call; hangs (2 s) on ``hang_on``, the first time only."""

    def counted(x: int) -> int:
        calls = len(list(Path(marker_dir).glob(f"{x}-*")))
        Path(marker_dir, f"{x}-{calls}").touch()
        if x == hang_on and calls == 0:
            time.sleep(2.0)
        return x

    return counted


@pytest.mark.parametrize("retries", [0, 1])
@pytest.mark.parametrize("backend", ["thread", "process"])
def test_a_timeout_in_a_batch_blames_the_call_that_hung(
    tmp_path: Path, backend: Backend, retries: int
) -> None:
    # Quick items travel in batches under a timeout too; the worker says which
    # call it is on, so the hung call fails (or is retried) at its own deadline,
    # and the calls after it run once.  On processes the calls before it in its
    # batch may run again (their results went with the killed worker); a thread's
    # replacement takes them over.
    n, hang_on = 400, 300
    fn = counting_calls(str(tmp_path), hang_on)
    timed = stage(backend=backend, workers=1, timeout=0.5, retries=retries, backoff=0.01)
    run = timed(fn).run(range(n))
    results = list(run)
    calls = [len(list(tmp_path.glob(f"{x}-*"))) for x in range(n)]
    if retries:
        assert [r.unwrap() for r in results] == list(range(n))
        assert calls[hang_on] == 2
    else:
        assert [r.unwrap() for i, r in enumerate(results) if i != hang_on] == [
            x for x in range(n) if x != hang_on
        ]
        error = results[hang_on].failure()
        assert isinstance(error.exception, StageTimeout)
        assert (error.item, error.attempts) == (hang_on, 1)
        assert calls[hang_on] == 1
    assert all(c == 1 for c in calls[hang_on + 1 :])
    assert all(1 <= c <= (2 if backend == "process" else 1) for c in calls[:hang_on])
    stats = run.statistics().stages[0]
    assert (stats.timed_out, stats.restarts) == (1 - retries, 1)


def hangs_on_300(x: int) -> int:
    if x == 300:
        time.sleep(1.0)
    return x


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_a_retry_that_times_out_again_keeps_the_rest_of_its_batch(backend: Backend) -> None:
    # The replacement of a stuck thread retries the stuck item, then runs the items
    # after it; when the retry hangs too, the next replacement must carry both on.
    run = stage(backend=backend, workers=1, timeout=0.2, retries=1, backoff=0.001)(
        hangs_on_300
    ).run(range(400))
    results = list(run)
    assert [r.unwrap() for i, r in enumerate(results) if i != 300] == [
        x for x in range(400) if x != 300
    ]
    error = results[300].failure()
    assert isinstance(error.exception, StageTimeout)
    assert error.attempts == 2
    assert run.statistics().stages[0].restarts == 2


def failing_first(path: str) -> Callable[[int], int]:
    """Notes the time of every call in ``path``; the first call raises."""

    def call(x: int) -> int:
        with open(path, "a") as log:
            log.write(f"{time.time()}\n")
        if len(Path(path).read_text().split()) == 1:
            raise ConnectionError("the first call fails")
        return x

    return call


def test_a_retry_waits_its_backoff_first(backend: Backend, tmp_path: Path) -> None:
    log = str(tmp_path / "calls")
    fn = failing_first(log)
    timed: Stage[int, int]
    if backend == "task":

        async def call(x: int) -> int:
            return fn(x)

        timed = stage(backend="task", retries=2, backoff=0.2)(call)
    else:
        timed = stage(backend=backend, retries=2, backoff=0.2)(fn)
    run = timed.run([7])
    assert [r.unwrap() for r in run] == [7]
    first, second = (float(t) for t in Path(log).read_text().split())
    # tenacity's exponential backoff with jitter: 0.2 s, plus up to 0.2 s of jitter
    assert second - first >= 0.19
    assert run.statistics().stages[0].retried == 1


@pytest.mark.parametrize("is_async", [False, True])
def test_closing_a_run_ends_the_backoff_of_a_retry_on_a_thread(is_async: bool) -> None:
    # The backoff was a plain sleep: close() waited for the run's join timeout, the
    # worker threads outlived the run, and they called the function again after
    # close() had returned.
    calls: list[int] = []
    both_failed = threading.Barrier(3)

    def always_fails(n: int) -> int:
        calls.append(n)
        if len(calls) <= 2:
            both_failed.wait(10)
        raise ValueError(n)

    async def always_fails_async(n: int) -> int:
        return always_fails(n)

    options = stage(workers=2, retries=4, backoff=30.0, max_backoff=60.0)
    failing = options(always_fails_async) if is_async else options(always_fails)
    run = failing.run(range(10))
    run.start()
    both_failed.wait(10)  # each worker's first try has failed: now it waits 30 s
    run.close()
    assert leftovers() == ([], [])
    assert len(calls) == 2


@pytest.mark.parametrize("retries", [0, 1, 2])
def test_retries_per_backend_and_attempt_counts(backend: Backend, retries: int) -> None:
    flaky = make_flaky(2)
    if backend == "task":

        async def call(x: int) -> int:
            return flaky(x)

        call.__qualname__ = "flaky"
        pipeline: Stage[int, int] = stage(
            backend="task", workers=2, retries=retries, backoff=0.001, retry_on=(ConnectionError,)
        )(call)
    else:
        pipeline = stage(
            backend=backend, workers=2, retries=retries, backoff=0.001, retry_on=(ConnectionError,)
        )(flaky)
    run = pipeline.run(range(6))
    results = list(run)
    for x, r in zip(range(6), results, strict=True):
        if x % 2 == 0 or retries == 2:
            assert r.unwrap() == x
        else:
            error = r.failure()
            assert isinstance(error.exception, ConnectionError)
            assert error.attempts == retries + 1
            assert f"after {retries + 1} attempts" in str(error) or retries == 0
    assert run.statistics().stages[0].retried == 3 * retries


def test_only_the_named_exceptions_are_retried(backend: Backend) -> None:
    def broken(x: int) -> int:
        raise ValueError(x)

    run = on(backend, broken).run([1])
    error = next(run).failure()
    assert error.attempts == 1
    retried = stage(retries=3, retry_on=(ConnectionError,), backoff=0.001)(broken)
    assert next(iter(retried.run([1]))).failure().attempts == 1


def test_a_crashed_worker_is_retried_when_the_stage_retries(tmp_path: Path) -> None:
    pipeline = stage(backend="process", workers=2, retries=1, backoff=0.001)(
        crash_once(str(tmp_path))
    )
    run = pipeline.run([3])  # alone: a batch whose worker dies is re-run item by item
    assert [r.unwrap() for r in run] == [3]
    stats = run.statistics().stages[0]
    assert stats.restarts == 1
    assert stats.retried == 1
    assert stats.crashed == 0


def test_without_retries_a_crash_fails_the_item_with_the_signal(tmp_path: Path) -> None:
    run = stage(backend="process")(crash_once(str(tmp_path))).run([3])
    error = next(run).failure()
    assert isinstance(error.exception, WorkerCrashed)
    assert error.exception.exitcode == 9
    assert "exit code 9" in str(error)


def test_fail_fast_stops_an_endless_run_promptly(backend: Backend) -> None:
    def fail_at_5(x: int) -> int:
        if x == 5:
            raise RuntimeError("five")
        return x

    started = time.monotonic()
    with pytest.raises(StageError, match="five") as caught:
        for _ in on(backend, fail_at_5).run(itertools.count(), fail_fast=True):
            pass
    assert isinstance(caught.value.exception, RuntimeError)  # the error itself, no group
    assert time.monotonic() - started < 10
    assert leftovers() == ([], [])


def test_statistics_account_for_every_item(backend: Backend) -> None:
    def odd_fails(x: int) -> int:
        if x % 2:
            raise ValueError(x)
        return x

    pipeline = on(backend, odd_fails) | on(backend, plus_one)
    run = pipeline.run(range(100))
    results = list(run)
    stats = run.statistics()
    assert stats.items_read == 100
    assert stats.succeeded == sum(isinstance(r, Success) for r in results) == 50
    assert stats.failed == sum(isinstance(r, Failure) for r in results) == 50
    assert stats.in_flight == 0
    first, second = stats.stages
    assert (first.items_in, first.succeeded, first.failed) == (100, 50, 50)
    assert (second.items_in, second.succeeded, second.failed) == (50, 50, 0)
    assert "odd_fails" in str(stats)


def even_fails_and_one_is_held(
    gate: threading.Event, reached: threading.Event | None = None
) -> Callable[[int], int]:
    def work(x: int) -> int:
        if x == 1:
            gate.wait(30)  # holds back every later result of an ordered run
        if x == 40 and reached is not None:
            reached.set()
        if x % 2 == 0 and x > 0:
            raise ValueError(x)
        return x

    return work


def test_statistics_count_what_the_caller_was_given() -> None:
    # Failures held back behind a slow item, or dropped by close(), are not "failed".
    gate, reached = threading.Event(), threading.Event()
    pipeline = stage(workers=4)(even_fails_and_one_is_held(gate, reached))
    with pipeline.run(range(200), window=64) as run:
        assert next(run).unwrap() == 0
        assert reached.wait(30)  # later items have failed meanwhile
        stats = run.statistics()
        assert (stats.succeeded, stats.failed) == (1, 0)
        gate.set()
        taken = [next(run) for _ in range(9)]  # items 1 to 9: 1, 3, 5, 7, 9 succeed
        stats = run.statistics()
        assert (stats.succeeded, stats.failed) == (6, 4)
        assert stats.failed == sum(isinstance(r, Failure) for r in taken)
    # Closed: the results not taken are dropped, not counted.
    stats = run.statistics()
    assert (stats.succeeded, stats.failed) == (6, 4)
    assert stats.items_read == stats.done + stats.in_flight


def test_fail_fast_counts_the_failure_it_raised_as_done() -> None:
    run = stage(even_fails_and_one_is_held(threading.Event())).run([2], fail_fast=True)
    with pytest.raises(StageError):
        next(run)
    stats = run.statistics()
    assert (stats.items_read, stats.done, stats.failed, stats.in_flight) == (1, 1, 1, 0)


# -- fault injection ----------------------------------------------------------------


def chaos(x: int) -> int:
    if x % 13 == 0:
        raise ValueError(f"unlucky {x}")
    if x % 97 == 0:
        time.sleep(5)  # beyond the timeout: the worker is killed
    return x * 2


def identity(x: int) -> int:
    return x


def plus_one(x: int) -> int:
    return x + 1


@pytest.mark.timeout(180)
def test_random_kills_exceptions_and_timeouts_lose_nothing() -> None:
    rng = random.Random(1234)
    n = 3000
    kill_at = set(rng.sample(range(100, n - 100), 8))
    pipeline = (
        stage(workers=2)(identity)
        | stage(backend="process", workers=2, timeout=1.0)(chaos)
        | on("task", plus_one)
    )
    started = time.monotonic()
    outcomes: dict[int, Result[int, StageError]] = {}
    killed = 0
    # `with`: a failed assertion still closes the run (its workers and the task loop)
    with pipeline.run(range(n), ordered=False) as run:
        for i, result in enumerate(run):
            if i in kill_at and (pids := worker_pids()):
                with contextlib.suppress(ProcessLookupError):  # it may have ended (a timeout)
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    killed += 1
            if isinstance(result, Success):
                key = (result.unwrap() - 1) // 2
            else:
                item = result.failure().item
                assert isinstance(item, int)
                key = item
            assert key not in outcomes, f"item {key} came out twice"
            outcomes[key] = result
    elapsed = time.monotonic() - started
    # Every input yields exactly one outcome...
    assert sorted(outcomes) == list(range(n))
    for x, result in outcomes.items():
        if isinstance(result, Failure):  # any item may be killed by the test while held
            expected: tuple[type[BaseException], ...] = (WorkerCrashed,)
            if x % 13 == 0:
                expected = (ValueError, WorkerCrashed)
            elif x % 97 == 0:
                expected = (StageTimeout, WorkerCrashed)
            assert isinstance(result.failure().exception, expected)
        else:
            assert x % 13
            assert x % 97
            assert result.unwrap() == 2 * x + 1
    # ...the statistics agree with what came out...
    stats = run.statistics()
    errors = [r.failure().exception for r in outcomes.values() if isinstance(r, Failure)]
    crashed = sum(isinstance(e, WorkerCrashed) for e in errors)
    timed_out = sum(isinstance(e, StageTimeout) for e in errors)
    chaos_stats = stats.stages[1]
    assert chaos_stats.crashed == crashed
    assert chaos_stats.timed_out == timed_out
    assert timed_out + crashed >= len([x for x in range(n) if x % 97 == 0 and x % 13])
    assert chaos_stats.restarts >= chaos_stats.timed_out + crashed
    assert stats.succeeded + stats.failed == n
    # ...and the run ended in bounded time with nothing left running.
    assert elapsed < 120
    assert killed > 0
    assert leftovers() == ([], [])


# -- rate limits ------------------------------------------------------------------------


def stamp(x: int) -> float:
    return time.monotonic()  # the system's monotonic clock: comparable across processes


async def astamp(x: int) -> float:
    return time.monotonic()


def test_a_rate_limit_spaces_calls_across_all_workers(backend: Backend) -> None:
    rate = 40.0
    if backend == "task":
        limited: Stage[int, float] = stage(workers=4, backend="task", rate=rate)(astamp)
    else:
        limited = stage(workers=3, backend=backend, rate=rate)(stamp)
    started = time.monotonic()
    times = [r.unwrap() for r in limited.run(range(12))]
    # The 12th call cannot start before 11 slots of 1/rate have passed, however
    # many workers there are (a late worker only makes it later).
    assert max(times) - started >= 11 / rate


class Tries:
    """Counts the tries of each item in files, so that every backend's workers share them."""

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)

    def next(self, x: int) -> int:
        """Record one more try of ``x``; returns its number (1 for the first)."""
        path = Path(self.folder, f"{x}-{time.monotonic_ns()}-{os.getpid()}")
        path.touch()
        return len(list(Path(self.folder).glob(f"{x}-*")))

    def stamps(self) -> list[float]:
        return sorted(int(p.name.split("-")[1]) / 1e9 for p in Path(self.folder).iterdir())


def fails_three_times(tries: Tries) -> Callable[[int], int]:
    def call(x: int) -> int:
        if tries.next(x) <= 3:
            raise ConnectionError("reset")
        return x

    return call


def hangs_on_the_second_try(tries: Tries) -> Callable[[int], int]:
    def call(x: int) -> int:
        if tries.next(x) == 2:
            time.sleep(1.0)  # past the 0.3 s deadline; short, for the leftovers check
        raise ConnectionError("reset")

    return call


def always_refused(tries: Tries) -> Callable[[int], int]:
    def call(x: int) -> int:
        tries.next(x)
        raise ConnectionError("429 too many requests")

    return call


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_a_timeout_is_for_each_try_not_for_the_backoff_between_them(
    backend: Backend, tmp_path: Path
) -> None:
    # Three instant failures with 0.4-0.6 s of backoff between them: 1.2 s of
    # waiting, more than the 1 s timeout, which is each try's alone.
    fn = fails_three_times(Tries(tmp_path))
    flaky = stage(backend=backend, timeout=1.0, retries=3, backoff=0.4, max_backoff=0.6)(fn)
    run = flaky.run([7])
    assert [r.unwrap() for r in run] == [7]
    assert run.statistics().stages[0].retried == 3


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_a_try_past_its_deadline_uses_up_one_of_the_retries(
    backend: Backend, tmp_path: Path
) -> None:
    tries = Tries(tmp_path)
    fn = hangs_on_the_second_try(tries)
    stuck = stage(backend=backend, timeout=0.3, retries=3, backoff=0.01, max_backoff=0.01)(fn)
    (result,) = stuck.run([5])
    assert result.failure().attempts == 4
    assert len(list(tmp_path.iterdir())) == 4  # 1 + retries, the timed-out one included


@pytest.mark.parametrize(
    ("backend", "kind"),
    [
        ("thread", "sync"),
        ("thread", "async"),
        ("process", "sync"),
        ("process", "async"),
        ("task", "async"),
    ],  # a task stage's function is async
)
def test_every_try_takes_a_slot_of_the_rate(backend: Backend, kind: str, tmp_path: Path) -> None:
    # A service answering "429" is tried again no faster than the stage's rate,
    # on every backend (a process worker's retries ask the parent for their slots).
    tries = Tries(tmp_path)
    limited: Stage[int, int]
    if kind == "async":

        async def refused(x: int) -> int:
            return always_refused(tries)(x)

        limited = stage(
            workers=2, backend=backend, rate=20.0, retries=2, backoff=0.0, max_backoff=0.0
        )(refused)
    else:
        assert backend != "task"
        limited = stage(
            workers=2, backend=backend, rate=20.0, retries=2, backoff=0.0, max_backoff=0.0
        )(always_refused(tries))
    results = list(limited.run(range(3)))
    assert all(r.failure().attempts == 3 for r in results)
    stamps = tries.stamps()
    assert len(stamps) == 9
    assert stamps[-1] - stamps[0] >= 8 / 20.0 * 0.95  # 9 tries: 8 slots of 1/rate apart


def test_the_rate_limiter_hands_out_evenly_spaced_slots() -> None:
    from typeflow._backends._base import RateLimiter

    limiter = RateLimiter(10.0)
    delays = [limiter.reserve() for _ in range(5)]
    assert delays[0] == 0.0
    assert delays == sorted(delays)
    assert delays[-1] == pytest.approx(0.4, abs=0.05)
    assert limiter.reserve(3) == pytest.approx(0.5, abs=0.05)  # 3 calls take 3 slots
    assert limiter.reserve() == pytest.approx(0.8, abs=0.05)


def test_rate_must_be_positive() -> None:
    with pytest.raises(DefinitionError, match="rate=0"):
        stage(rate=0)


def test_a_thread_worker_survives_what_would_kill_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from typeflow._runtime._kernel import FnKernel

    original = FnKernel.process_columns
    calls = 0

    def dies_once(self: FnKernel, keys: object, items: object, ctx: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise SystemExit("a worker thread would end here")
        return original(self, keys, items, ctx)  # type: ignore[arg-type] # the test's own stand-in

    monkeypatch.setattr(FnKernel, "process_columns", dies_once)
    results = list(stage(workers=1)(plus_one).run(range(20), window=20))
    assert len(results) == 20  # nothing lost, nothing hangs
    failed = [r.failure() for r in results if isinstance(r, Failure)]
    assert failed
    assert all(isinstance(f.exception, SystemExit) for f in failed)
    assert [r.unwrap() for r in results if isinstance(r, Success)] == [
        x + 1 for x in range(20) if x not in {f.item for f in failed}
    ]


async def cancels_itself_on_three(x: int) -> int:
    """Raises CancelledError on 3, as code that cancels a task of its own and lets
    that out may: not the run cancelling the worker."""
    await asyncio.sleep(0)
    if x == 3:
        raise asyncio.CancelledError
    return x


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("ordered", [True, False])
def test_a_cancelled_error_from_the_function_fails_only_its_item(
    backend: Backend, workers: int, ordered: bool
) -> None:
    run = stage(workers=workers, backend=backend)(cancels_itself_on_three).run(
        range(8), ordered=ordered
    )
    results = list(run)
    failed = [r.failure() for r in results if isinstance(r, Failure)]
    assert [(f.item, type(f.exception)) for f in failed] == [(3, asyncio.CancelledError)]
    assert sorted(r.unwrap() for r in results if isinstance(r, Success)) == [0, 1, 2, 4, 5, 6, 7]
    stats = run.statistics()
    assert (stats.in_flight, stats.stages[0].restarts) == (0, 0)


def deaf_to_sigterm(fifo: str) -> Callable[[int], int]:
    """Item 0 says so through ``fifo``, blocks SIGTERM and waits far beyond the
    test's timeout: a worker that a polite stop cannot end (as one stuck in a long
    C call, which cannot run the signal's handler)."""

    def call(x: int) -> int:
        if x == 0:
            with open(fifo, "wb") as out:
                out.write(b"x")
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            time.sleep(600)
        return x

    return call


@pytest.mark.timeout(30)
def test_closing_a_run_kills_a_worker_that_does_not_end_on_sigterm(tmp_path: Path) -> None:
    fifo = tmp_path / "began"
    os.mkfifo(fifo)
    fn = deaf_to_sigterm(str(fifo))
    run = stage(workers=2, backend="process")(fn).run(itertools.count(), ordered=False)
    run.start()
    with fifo.open("rb") as began:
        assert began.read(1) == b"x"  # item 0's call has begun, SIGTERM blocked
    run.close()  # SIGTERM, a second's grace, then SIGKILL
    assert leftovers() == ([], [])


class HeldTeardown(StatefulStage[int, int], workers=1):
    # Class attributes: each worker gets its own copy of the stage object.
    tearing: ClassVar[threading.Event] = threading.Event()
    release: ClassVar[threading.Event] = threading.Event()

    def process(self, item: int, /) -> int:
        return item

    def teardown(self) -> None:
        HeldTeardown.tearing.set()
        HeldTeardown.release.wait(30)


def test_a_second_close_returns_only_once_the_run_has_stopped() -> None:
    tearing, release = HeldTeardown.tearing, HeldTeardown.release
    tearing.clear()
    release.clear()
    run = HeldTeardown().run(itertools.count())
    next(run)
    first = threading.Thread(target=run.close)
    first.start()
    assert tearing.wait(30)  # the first close() is joining the worker, in its teardown
    second = threading.Thread(target=run.close)
    second.start()
    second.join(0.3)
    assert second.is_alive()  # it used to return at once: "closed" before it was
    release.set()
    first.join(30)
    second.join(30)
    assert not first.is_alive()
    assert not second.is_alive()
    assert leftovers() == ([], [])


def test_runs_closed_as_they_start_leave_no_traces_on_stderr(
    capfd: pytest.CaptureFixture[str],
) -> None:
    # A SIGTERM could land in a worker before its own handler was in place (it ran
    # the parent's) or outside the code that expects it: tracebacks on stderr.
    pipeline = stage(workers=2, backend="process")(plus_one)
    for _ in range(100):
        assert [r.unwrap() for r in pipeline.run(itertools.count()).take(1)] == [1]
    assert leftovers() == ([], [])
    assert capfd.readouterr().err == ""


def test_closing_a_run_waits_for_a_stuck_thread_only_until_its_deadline() -> None:
    entered, release = threading.Event(), threading.Event()

    def stuck_on_three(x: int) -> int:
        if x == 3:
            entered.set()
            release.wait(30)
        return x

    run = stage(workers=2, timeout=0.3)(stuck_on_three).run(itertools.count())
    assert [next(run).unwrap(), next(run).unwrap()] == [0, 1]
    assert entered.wait(30)
    started = time.monotonic()
    run.close()
    took = time.monotonic() - started
    release.set()  # lets the abandoned thread end, for the leftovers check
    assert took < 4.0  # the call's 0.3 s deadline, not the 5 s given to a call without one
    assert leftovers() == ([], [])


class CancelledInSetup(StatefulStage[int, int], backend="process", workers=1):
    """Says (through a FIFO) that its setup has begun, then takes a moment to finish it."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def setup(self) -> None:
        with Path(self.folder, "began").open("wb") as began:
            began.write(b"x")
        time.sleep(0.2)  # the run is closed meanwhile
        Path(self.folder, "set-up").touch()

    def process(self, x: int, /) -> int:
        return x

    def teardown(self) -> None:
        Path(self.folder, "torn-down").touch()


@pytest.mark.timeout(30)
def test_a_run_closed_during_a_setup_still_tears_that_setup_down(tmp_path: Path) -> None:
    # SIGTERM waits for the setup to end (it would otherwise land in it and
    # leave what it opened without a teardown), then ends the worker.
    os.mkfifo(tmp_path / "began")
    run = CancelledInSetup(str(tmp_path)).run(itertools.count())
    run.start()
    with (tmp_path / "began").open("rb") as began:
        assert began.read(1) == b"x"
    run.close()
    assert (tmp_path / "set-up").exists()
    assert (tmp_path / "torn-down").exists()
    assert leftovers() == ([], [])


class SlowToStart(StatefulStage[int, int]):
    """A setup longer than the timeout (a model to load); item 3 hangs."""

    def __init__(self, journal: str) -> None:
        self.journal = journal

    def setup(self) -> None:
        Path(self.journal, f"setup-{os.getpid()}-{time.monotonic_ns()}").touch()
        time.sleep(0.4)

    def process(self, x: int, /) -> int:
        if x == 3:
            time.sleep(2.0)
        return x


class SlowToStartOnThreads(SlowToStart, timeout=0.2):
    pass


class SlowToStartOnProcesses(SlowToStart, backend="process", timeout=0.2):
    pass


@pytest.mark.parametrize("make", [SlowToStartOnThreads, SlowToStartOnProcesses])
def test_a_setup_longer_than_the_timeout_is_not_a_call_past_it(
    make: Callable[[str], Stage[int, int]], tmp_path: Path
) -> None:
    # The timeout is for each call; the setup (run again by the worker that
    # replaces the one stuck on item 3) does not count against any of them.
    results = list(make(str(tmp_path)).run(range(6)))
    assert [r.unwrap() for r in results if isinstance(r, Success)] == [0, 1, 2, 4, 5]
    (failed,) = [r.failure() for r in results if isinstance(r, Failure)]
    assert (failed.item, type(failed.exception)) == (3, StageTimeout)
    assert len(list(tmp_path.iterdir())) == 2  # the first worker's setup, its replacement's
