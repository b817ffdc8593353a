"""Random pipelines against the plain sequential composition of the same functions."""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from returns.result import Result, Success

from tests.conftest import on
from typeflow import (
    Backend,
    Stage,
    StageError,
    StageTimeout,
    WorkerCrashed,
    flat_map,
    fork,
    keep,
    stage,
)
from typeflow._backends._wire import OUT_OF_BAND_MIN

pytestmark = pytest.mark.timeout(300)


def inc(x: int) -> int:
    return x + 1


def double(x: int) -> int:
    return 2 * x


def negate(x: int) -> int:
    return -x


def square_mod(x: int) -> int:
    return x * x % 1009


def reject_sevens(x: int) -> int:
    if x % 7 == 0:
        raise ValueError(f"{x} is a multiple of 7")
    return x


def hundred_over_mod5(x: int) -> int:
    return 100 // (x % 5)


FUNCTIONS: list[Callable[[int], int]] = [
    inc,
    double,
    negate,
    square_mod,
    reject_sevens,
    hundred_over_mod5,
]

#: What one item became: its value, or (stage, item the stage got, exception type).
Outcome = tuple[bool, object]


@dataclass(frozen=True)
class Step:
    fn: Callable[[int], int]
    backend: Backend
    workers: int
    buffer: int
    #: As an ``async def`` function (always, on tasks), run on the worker's own loop.
    coroutine: bool = False


steps = st.builds(
    Step,
    fn=st.sampled_from(FUNCTIONS),
    backend=st.sampled_from(["thread", "process", "task"]),
    workers=st.integers(1, 3),
    buffer=st.integers(1, 8),
    coroutine=st.booleans(),
)


def step_stage(step: Step) -> Stage[int, int]:
    if not step.coroutine or step.backend == "task":
        return on(step.backend, step.fn, step.workers, step.buffer)
    fn = step.fn

    async def call(x: int) -> int:
        return fn(x)

    call.__qualname__ = fn.__qualname__  # failures name the stage after the function
    return stage(workers=step.workers, backend=step.backend, buffer=step.buffer)(call)


def sequential(chain: list[Step], x: int) -> Outcome:
    for step in chain:
        try:
            y = step.fn(x)
        except Exception as exc:  # noqa: BLE001 - the reference records every failure
            return (False, (step.fn.__qualname__, x, type(exc)))
        x = y
    return (True, x)


def observed(result: Result[int, StageError]) -> Outcome:
    if isinstance(result, Success):
        return (True, result.unwrap())
    error = result.failure()
    return (False, (error.stage, error.item, type(error.exception)))


def build(chain: list[Step]) -> Stage[int, int]:
    pipeline = step_stage(chain[0])
    for step in chain[1:]:
        pipeline = pipeline | step_stage(step)
    return pipeline


@given(
    chain=st.lists(steps, min_size=1, max_size=4),
    items=st.lists(st.integers(-1000, 1000), max_size=120),
    ordered=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 50)),
    lazy=st.booleans(),
)
def test_random_pipelines_match_the_sequential_composition(
    chain: list[Step], items: list[int], ordered: bool, window: int | None, lazy: bool
) -> None:
    expected = [sequential(chain, x) for x in items]
    # A list is fed in chunks, any other iterable one item at a time: both are drawn.
    source: Iterable[int] = iter(items) if lazy else items
    got = [observed(r) for r in build(chain).run(source, ordered=ordered, window=window)]
    # Every input yields exactly one outcome, failures included...
    assert len(got) == len(items)
    # ...equal to the sequential composition: as a sequence when ordered,
    # as a multiset when not.
    if ordered:
        assert got == expected
    else:
        assert Counter(map(repr, got)) == Counter(map(repr, expected))


# -- shapes: one-to-many, filters, batches and forks ----------------------------------------


def explode_small(x: int) -> list[int]:
    """0 to 2 outputs: a filter, a map or a one-to-many, depending on the item."""
    return [x + i for i in range(abs(x) % 3)]


def add_pair(pair: tuple[int, int]) -> int:
    return pair[0] + pair[1]


@dataclass(frozen=True)
class Shape:
    kind: str  # "map", "flat", "keep", "fork", "batch"
    fn: Callable[[int], int]
    other: Callable[[int], int]
    backend: Backend
    workers: int
    #: Under a timeout (never reached): calls run one at a time, each with its deadline.
    timed: bool


shapes = st.builds(
    Shape,
    kind=st.sampled_from(["map", "flat", "keep", "fork", "batch"]),
    fn=st.sampled_from(FUNCTIONS),
    other=st.sampled_from(FUNCTIONS),
    backend=st.sampled_from(["thread", "process", "task"]),
    workers=st.integers(1, 3),
    timed=st.booleans(),
)


def shape_stage(shape: Shape) -> Stage[int, int]:
    timeout = 60.0 if shape.timed else None
    if shape.kind == "map":
        if shape.backend == "task" or timeout is None:
            return on(shape.backend, shape.fn, shape.workers)
        return stage(workers=shape.workers, backend=shape.backend, timeout=timeout)(shape.fn)
    if shape.kind == "flat":
        if shape.backend == "task":
            return flat_map(workers=shape.workers, timeout=timeout)(explode_small)
        return flat_map(workers=shape.workers, backend=shape.backend, timeout=timeout)(
            explode_small
        )
    if shape.kind == "keep":
        if shape.backend == "task":
            return keep(ais_odd, workers=shape.workers, backend="task")
        return keep(is_odd, workers=shape.workers, backend=shape.backend)
    if shape.kind == "fork":
        both = fork(on(shape.backend, shape.fn), on("thread", shape.other))
        return both | stage(add_pair)
    return stage(inc).batch(3, timeout=0.01).unbatch()


def is_odd(x: int) -> bool:
    return x % 2 == 1


async def ais_odd(x: int) -> bool:
    return is_odd(x)


def reference(chain: list[Shape], x: int) -> list[Outcome]:
    """The outcomes of one input through ``chain``, one call at a time, depth first
    (the order of an ordered run: siblings in the order they were made)."""
    if not chain:
        return [(True, x)]
    shape, rest = chain[0], chain[1:]
    try:
        if shape.kind == "map":
            values = [_call(shape.fn, x)]
        elif shape.kind == "flat":
            values = explode_small(x)
        elif shape.kind == "keep":
            values = [x] if is_odd(x) else []
        elif shape.kind == "fork":
            values = [_call(shape.fn, x) + _call(shape.other, x)]
        else:
            values = [inc(x)]
    except _Failed as failed:
        return [(False, (failed.name, x, failed.kind))]
    return [outcome for v in values for outcome in reference(rest, v)]


class _Failed(Exception):
    def __init__(self, name: str, kind: type[BaseException]) -> None:
        self.name = name
        self.kind = kind


def _call(fn: Callable[[int], int], v: int) -> int:
    try:
        return fn(v)
    except Exception as exc:
        raise _Failed(fn.__qualname__, type(exc)) from exc


@given(
    chain=st.lists(shapes, min_size=1, max_size=3),
    items=st.lists(st.integers(-200, 200), max_size=60),
    ordered=st.booleans(),
    lazy=st.booleans(),
)
def test_random_shaped_pipelines_match_the_sequential_reference(
    chain: list[Shape], items: list[int], ordered: bool, lazy: bool
) -> None:
    pipeline = shape_stage(chain[0])
    for shape in chain[1:]:
        pipeline = pipeline | shape_stage(shape)
    run = pipeline.run(iter(items) if lazy else items, ordered=ordered)
    got = [observed(r) for r in run]
    expected = [o for x in items for o in reference(chain, x)]
    # Every input is accounted for: its outputs and failures come out, and the
    # run knows every item is done.
    assert run.statistics().in_flight == 0
    assert run.statistics().done == len(items)
    has_batch = any(s.kind == "batch" for s in chain)
    if ordered and not has_batch:  # a batch holds items in arrival order
        assert got == expected
    else:
        assert Counter(map(repr, got)) == Counter(map(repr, expected))


# -- failures and retries against the statistics ----------------------------------------------


def make_flaky() -> Callable[[int], int]:
    """Fails the first call with each multiple of 3 (per worker), then works."""
    seen: set[int] = set()

    def flaky(x: int) -> int:
        if x % 3 == 0 and x not in seen:
            seen.add(x)
            raise ConnectionError(f"flaky {x}")
        return x

    return flaky


@given(
    chain=st.lists(steps, min_size=0, max_size=2),
    retries=st.integers(0, 2),
    flaky_backend=st.sampled_from(["thread", "process"]),
    items=st.lists(st.integers(-300, 300), max_size=80, unique=True),
)
def test_failures_and_retries_match_the_statistics(
    chain: list[Step], retries: int, flaky_backend: Backend, items: list[int]
) -> None:
    flaky = stage(workers=2, backend=flaky_backend, retries=retries, backoff=0.0)(make_flaky())
    pipeline: Stage[int, int] = flaky
    for step in chain:
        pipeline = pipeline | step_stage(step)
    run = pipeline.run(items)
    got = [observed(r) for r in run]
    stats = run.statistics()

    def expected_for(x: int) -> Outcome:
        if x % 3 == 0 and retries == 0:
            return (False, ("make_flaky.<locals>.flaky", x, ConnectionError))
        return sequential(chain, x) if chain else (True, x)

    assert got == [expected_for(x) for x in items]
    failures = sum(not ok for ok, _ in got)
    assert (stats.succeeded, stats.failed) == (len(items) - failures, failures)
    assert sum(s.failed for s in stats.stages) == failures
    assert stats.stages[-1].succeeded == len(items) - failures
    assert stats.stages[0].retried == (sum(1 for x in items if x % 3 == 0) if retries else 0)
    assert (stats.items_read, stats.done, stats.in_flight) == (len(items), len(items), 0)


# -- faults: workers that die or hang on some items ---------------------------------------

#: A hung call sleeps this long, past the faulty stage's timeout.
HANG_S = 1.0
FAULT_TIMEOUT_S = 0.2


@dataclass(frozen=True)
class Fault:
    """A first stage that kills its worker (``os._exit``) or hangs on the items ``at``."""

    kind: str  # "map", "flat", "keep"
    fault: str  # "crash" (process workers only) or "hang"
    backend: Backend
    permanent: bool  # every call on those items faults, or only the first
    retries: int
    workers: int
    at: frozenset[int]


def fault_once(fault: Fault, marker_dir: str, x: int) -> bool:
    """Fault on ``x`` if it is one of the stage's; True for a hang left to the caller."""
    if x not in fault.at:
        return False
    marker = Path(marker_dir, str(x))
    if not fault.permanent and marker.exists():
        return False
    marker.touch()
    if fault.fault == "crash":
        os._exit(9)
    if fault.backend == "task":
        return True
    time.sleep(HANG_S)
    return False


class _Supervised(TypedDict):
    workers: int
    name: str
    timeout: float | None
    retries: int
    backoff: float


def faulty_stage(fault: Fault, marker_dir: str) -> Stage[int, int]:
    if fault.kind == "keep":  # a filter has no timeout nor retries: crashes only

        def odd(x: int) -> bool:
            fault_once(fault, marker_dir, x)
            return is_odd(x)

        return keep(odd, workers=fault.workers, backend=fault.backend, name="faulty")
    options: _Supervised = {
        "workers": fault.workers,
        "name": "faulty",
        "timeout": FAULT_TIMEOUT_S if fault.fault == "hang" else None,
        "retries": fault.retries,
        "backoff": 0.001,
    }
    if fault.kind == "flat":

        def explode(x: int) -> list[int]:
            fault_once(fault, marker_dir, x)
            return explode_small(x)

        return flat_map(backend=fault.backend, **options)(explode)

    if fault.backend == "task":

        async def aplus_one(x: int) -> int:
            if fault_once(fault, marker_dir, x):
                await asyncio.sleep(HANG_S)
            return inc(x)

        return stage(backend="task", **options)(aplus_one)

    def plus_one(x: int) -> int:
        fault_once(fault, marker_dir, x)
        return inc(x)

    return stage(backend=fault.backend, **options)(plus_one)


@st.composite
def faults(draw: st.DrawFn, items: list[int]) -> Fault:
    fault = draw(st.sampled_from(["crash", "hang"]))
    # A filter has no timeout nor retries: it only crashes, on every call.
    kinds = ["map", "flat", "keep"] if fault == "crash" else ["map", "flat"]
    kind = draw(st.sampled_from(kinds))
    backend: Backend = "process"
    if fault == "hang":
        # On tasks, a plain map (the kernel keeps its deadlines; flat maps go per call).
        backend = draw(
            st.sampled_from(
                ["thread", "process", "task"] if kind == "map" else ["thread", "process"]
            )
        )
    if kind == "keep":
        permanent, retries = True, 0
    else:
        permanent = draw(st.booleans())
        # A crash that happens once may be absorbed by running its batch again item
        # by item (not a retry): without retries, only a permanent one has one outcome.
        retries = 1 if fault == "crash" and not permanent else draw(st.integers(0, 1))
    at = draw(st.sets(st.sampled_from(items), max_size=2)) if items else set[int]()
    return Fault(kind, fault, backend, permanent, retries, draw(st.integers(1, 3)), frozenset(at))


def first_outputs(fault: Fault, x: int) -> list[int]:
    if fault.kind == "flat":
        return explode_small(x)
    if fault.kind == "keep":
        return [x] if is_odd(x) else []
    return [inc(x)]


@settings(max_examples=max(8, settings().max_examples // 4))
@given(
    data=st.data(),
    items=st.lists(st.integers(-200, 200), max_size=50, unique=True),
    rest=st.lists(shapes, max_size=2),
    ordered=st.booleans(),
)
def test_crashes_and_hangs_lose_nothing(
    data: st.DataObject, items: list[int], rest: list[Shape], ordered: bool
) -> None:
    fault = data.draw(faults(items))
    with tempfile.TemporaryDirectory() as marker_dir:
        pipeline = faulty_stage(fault, marker_dir)
        for shape in rest:
            pipeline = pipeline | shape_stage(shape)
        run = pipeline.run(items, ordered=ordered)
        got = [observed(r) for r in run]
    expected: list[Outcome] = []
    for x in items:
        if x in fault.at and (fault.permanent or not fault.retries):
            error = WorkerCrashed if fault.fault == "crash" else StageTimeout
            expected.append((False, ("faulty", x, error)))
        else:
            expected += [o for v in first_outputs(fault, x) for o in reference(rest, v)]
    assert run.statistics().in_flight == 0
    assert run.statistics().done == len(items)
    if ordered and not any(s.kind == "batch" for s in rest):
        assert got == expected
    else:
        assert Counter(map(repr, got)) == Counter(map(repr, expected))


#: Payload sizes around the wire's thresholds: in the pickle or out of band, in
#: one read or several, a reply that fits the worker's socket or one that does
#: not (nine times the largest, more than the 4 MiB asked for, doubled by Linux).
_PAYLOAD_SIZES = [0, 100, OUT_OF_BAND_MIN - 1, OUT_OF_BAND_MIN, 300_000, 1_100_000]


def reshape_payload(data: bytes | bytearray) -> bytes | bytearray | int:
    """Its length, itself, or nine copies of itself, by its first byte."""
    how = data[0] % 3 if data else 0
    if how == 0:
        return len(data)
    return data if how == 1 else data * 9


@settings(max_examples=max(8, settings().max_examples // 4))
@given(
    specs=st.lists(
        st.tuples(st.sampled_from(_PAYLOAD_SIZES), st.integers(0, 2), st.booleans()),
        max_size=8,
    ),
    workers=st.integers(1, 2),
)
def test_payloads_of_any_size_cross_both_ways_as_a_plain_map_makes_them(
    specs: list[tuple[int, int, bool]], workers: int
) -> None:
    # Every item and result whole, in order and of its type, whichever way the
    # wire reads it: into place, copied after a read ahead, or (when a large reply
    # meets the next batch, which these short inputs make only now and then) read
    # by a worker while its own socket is full; the transport tests force that.
    payloads: list[bytes | bytearray] = [
        (bytearray if mutable else bytes)(bytes([how]) * size) for size, how, mutable in specs
    ]
    run = stage(workers=workers, backend="process")(reshape_payload).run(payloads)
    got = [r.unwrap() for r in run]
    expected = [reshape_payload(p) for p in payloads]
    assert got == expected
    assert [type(v) for v in got] == [type(v) for v in expected]


class _CollectorCore:
    """What the collector reads of a run: its order, fail_fast and window."""

    def __init__(self, ordered: bool) -> None:
        self.ordered = ordered
        self.fail_fast = False
        self.window = self
        self.given_back = 0

    def give_back(self, count: int) -> None:
        self.given_back += count


@given(
    counts=st.lists(st.sampled_from([0, 1, 1, 2, 3, 5]), min_size=1, max_size=40),
    failing=st.sets(st.integers(0, 200), max_size=20),
    ordered=st.booleans(),
    rnd=st.randoms(use_true_random=False),
)
def test_the_collector_releases_any_arrival_order_as_the_model_says(
    counts: list[int], failing: set[int], ordered: bool, rnd: random.Random
) -> None:
    # The outcome entries of a stage behind a one-to-many one, in any order a run
    # can deliver them (a root's DELTA before its outputs; outputs in batches of any
    # size, mixed across roots, siblings together or apart; failures one by one):
    # every root completes once, with its results in key order (ordered runs).
    from typeflow._runtime import _run

    outputs: list[tuple[int, tuple[int, ...] | int, object]] = []  # (root, key, value or error)
    announced: list[tuple[int, int]] = []
    for root, count in enumerate(counts):
        if count != 1:
            announced.append((root, count - 1))
        for i in range(count):
            key: tuple[int, ...] | int = root if count == 1 else (root, i)
            number = len(outputs)
            made: object = number
            if number in failing:
                made = StageError("s", number, ValueError(number))
            outputs.append((root, key, made))
    expected = [value for _, _, value in outputs]
    # Deliver: in order, or shuffled (each root's siblings kept together or not),
    # in batches, each root's DELTA before its first output.
    order = list(outputs)
    arrival = rnd.randrange(3)
    if arrival == 0:  # roots in order, siblings together and in order
        pass
    else:
        rnd.shuffle(order)
        if arrival == 1:
            order.sort(key=lambda o: o[0])  # roots in order, siblings together, any order
    entries: list[tuple[object, int, object]] = []
    pending_ok: list[tuple[object, object]] = []

    def flush() -> None:
        if pending_ok:
            keys, values = zip(*pending_ok, strict=True)
            entries.append((keys, _run.OKS, list(values)))
            pending_ok.clear()

    deltas = dict(announced)
    for root, key, value in order:
        if root in deltas:
            flush()
            entries.append((root, _run.DELTA, deltas.pop(root)))
        if isinstance(value, StageError):
            flush()
            entries.append((key, _run.FAILED, value))
        else:
            pending_ok.append((key, value))
            if rnd.random() < 0.3:
                flush()
    flush()
    entries += [(root, _run.DELTA, delta) for root, delta in deltas.items()]  # roots with none
    core = _CollectorCore(ordered)
    collector: _run._Collector[object] = _run._Collector(cast("_run.RunCore", core))  # pyright: ignore[reportPrivateUsage] - the collector under test
    got: list[object] = []
    while entries:
        cut = rnd.randint(1, len(entries))
        collector.accept(list(entries[:cut]))
        del entries[:cut]
        while (result := collector.pop()) is not None:
            got.append(result.unwrap() if isinstance(result, Success) else result.failure())
    assert collector.completed == len(counts)
    assert got == expected if ordered else Counter(map(id, got)) == Counter(map(id, expected))
