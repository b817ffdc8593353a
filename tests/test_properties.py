"""Random pipelines against the plain sequential composition of the same functions."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from returns.result import Result, Success

from tests.conftest import on
from typeflow import Backend, Stage, StageError

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


steps = st.builds(
    Step,
    fn=st.sampled_from(FUNCTIONS),
    backend=st.sampled_from(["thread", "process", "task"]),
    workers=st.integers(1, 3),
    buffer=st.integers(1, 8),
)


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
    pipeline: Stage[int, int] = on(chain[0].backend, chain[0].fn, chain[0].workers, chain[0].buffer)
    for step in chain[1:]:
        pipeline = pipeline | on(step.backend, step.fn, step.workers, step.buffer)
    return pipeline


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    chain=st.lists(steps, min_size=1, max_size=4),
    items=st.lists(st.integers(-1000, 1000), max_size=120),
    ordered=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 50)),
)
def test_random_pipelines_match_the_sequential_composition(
    chain: list[Step], items: list[int], ordered: bool, window: int | None
) -> None:
    expected = [sequential(chain, x) for x in items]
    got = [observed(r) for r in build(chain).run(items, ordered=ordered, window=window)]
    # Every input yields exactly one outcome, failures included...
    assert len(got) == len(items)
    # ...equal to the sequential composition: as a sequence when ordered,
    # as a multiset when not.
    if ordered:
        assert got == expected
    else:
        assert Counter(map(repr, got)) == Counter(map(repr, expected))
