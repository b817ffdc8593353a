"""Bad input is refused where it is written, with a message that names it and says the fix."""

from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from typeflow import (
    Backend,
    CompositionError,
    DefinitionError,
    flat_map,
    fork,
    keep,
    keep_type,
    merge,
    route,
    stage,
)

pytestmark = pytest.mark.timeout(60)


def length(word: str) -> int:
    return len(word)


def shout(word: str) -> str:
    return word.upper()


def is_short(word: str) -> bool:
    return len(word) < 3


# -- predicates -------------------------------------------------------------------------


def test_keep_refuses_a_predicate_that_is_not_callable() -> None:
    with pytest.raises(DefinitionError, match=r"keep needs a predicate function, not 3; pass"):
        keep(3)  # type: ignore[call-overload] # untyped callers are what this checks


def test_the_keep_method_refuses_a_predicate_that_is_not_callable() -> None:
    with pytest.raises(DefinitionError, match=r"keep needs a predicate function, not 'x'"):
        stage(length).keep("x")  # type: ignore[call-overload] # untyped callers


def test_keep_refuses_a_generator_predicate() -> None:
    def gen(word: str) -> Iterator[bool]:
        yield True

    with pytest.raises(DefinitionError, match=r"keep got the generator function .*gen"):
        keep(gen)


def test_flat_map_refuses_a_function_annotated_to_return_no_iterable() -> None:
    def size(word: str) -> int | None:
        return len(word)

    with pytest.raises(DefinitionError, match=r"size' is annotated to return int \| None"):
        flat_map(size)  # type: ignore[arg-type] # untyped callers
    with pytest.raises(DefinitionError, match=r"return a list \(one value: \[value\]\)"):
        flat_map(workers=2)(size)  # type: ignore[arg-type] # untyped callers

    def letters(word: str) -> str:  # a str is iterable: its characters are the outputs
        return word

    assert [r.unwrap() for r in flat_map(letters).run(["ab"])] == ["a", "b"]


def test_route_refuses_a_predicate_that_is_not_callable() -> None:
    with pytest.raises(DefinitionError, match=r"route needs a predicate function, not 3; pass"):
        route(3, stage(length), stage(length))  # type: ignore[call-overload] # untyped callers


def test_route_refuses_a_predicate_of_the_wrong_arity() -> None:
    def two(word: str, other: str) -> bool:
        return word == other

    with pytest.raises(DefinitionError, match=r"route's predicate is called with one item"):
        route(two, stage(length), stage(length))  # type: ignore[arg-type] # untyped callers


def test_route_refuses_an_async_predicate() -> None:
    async def check(word: str) -> bool:
        return len(word) < 3

    # Called in the run's thread, it would return a coroutine: always true.
    with pytest.raises(DefinitionError, match=r"route got the coroutine function .*check"):
        route(check, stage(length), stage(length))


def test_route_refuses_an_async_generator_predicate() -> None:
    async def check(word: str) -> AsyncIterator[bool]:
        yield True

    with pytest.raises(DefinitionError, match=r"route got the generator function .*check"):
        route(check, stage(length), stage(length))


def test_good_predicates_are_still_accepted() -> None:
    results = route(is_short, stage(length), stage(shout).map(length)).run(["ab", "abcd"])
    assert [r.unwrap() for r in results] == [2, 4]
    assert [r.unwrap() for r in keep(is_short).run(["ab", "abcd"])] == ["ab"]


# -- branches ---------------------------------------------------------------------------


def test_fork_names_a_branch_that_is_not_a_stage_before_counting() -> None:
    with pytest.raises(DefinitionError, match=r"fork branch 0 is <function length.*@stage"):
        fork(length)  # type: ignore[call-overload] # untyped callers are what this checks
    with pytest.raises(DefinitionError, match=r"fork branch 1 is <function shout.*@stage"):
        fork(stage(length), shout)  # type: ignore[call-overload] # untyped callers


def test_fork_still_counts_its_branches() -> None:
    with pytest.raises(DefinitionError, match="at least two branches, not 1"):
        fork(stage(length))


def test_route_names_a_branch_that_is_not_a_stage() -> None:
    with pytest.raises(DefinitionError, match=r"route branch 1 is <function shout.*@stage"):
        route(is_short, stage(shout), shout)  # type: ignore[call-overload] # untyped callers


# -- feeds and merges -------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, -1, 2.5, True])
def test_feed_refuses_a_bad_capacity(capacity: object) -> None:
    named = f"feed: capacity={capacity!r} is not allowed"
    with pytest.raises(DefinitionError, match=re.escape(named)):
        stage(length).feed(capacity=capacity)  # type: ignore[arg-type] # untyped callers


@pytest.mark.parametrize("timeout", [-1, "1", float("nan"), True])
def test_feed_put_refuses_a_bad_timeout(timeout: object) -> None:
    with stage(length).feed() as feed:
        named = f"put(timeout={timeout!r}): give seconds as a number of at least 0"
        with pytest.raises(ValueError, match=re.escape(named)):
            feed.put("ab", timeout=timeout)  # type: ignore[arg-type] # untyped callers
        feed.put("abc", timeout=0)  # there is room: a put that need not wait
        feed.close()
        assert [r.unwrap() for r in feed] == [3]


@pytest.mark.parametrize("capacity", [0, -1, 2.5, True])
def test_merge_refuses_a_bad_capacity(capacity: object) -> None:
    named = f"merge: capacity={capacity!r} is not allowed"
    with pytest.raises(DefinitionError, match=re.escape(named)):
        merge([1], [2], capacity=capacity)  # type: ignore[call-overload] # untyped callers


def test_a_refused_merge_prints_nothing_when_collected(
    capsys: pytest.CaptureFixture[str],
) -> None:
    unraisable: list[object] = []

    def hook(info: object) -> None:
        unraisable.append(info)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.unraisablehook", hook)
        with pytest.raises(ValueError, match="capacity"):  # the channel raised a bare one
            merge([1], capacity=0)
        gc.collect()
    assert unraisable == []
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("source", [3, None, object()])
def test_merge_refuses_a_source_that_cannot_be_iterated(source: object) -> None:
    with pytest.raises(DefinitionError, match=r"merge source 1 is .*cannot be iterated"):
        merge([1], source)  # type: ignore[call-overload] # untyped callers are what this checks


def test_merge_refuses_one_string_as_a_source() -> None:
    with pytest.raises(DefinitionError, match=r"merge source 1 is one str value, 'abc', which"):
        merge([1], "abc")


def test_merge_refuses_a_lone_bad_source() -> None:
    with pytest.raises(DefinitionError, match=r"merge source 0 is 3, which cannot be iterated"):
        merge(3)  # type: ignore[call-overload] # untyped callers are what this checks


def test_merge_checks_its_sources_without_consuming_them() -> None:
    taken: list[int] = []

    def source() -> Iterator[int]:
        for i in range(3):
            taken.append(i)
            yield i

    gen = source()
    with pytest.raises(DefinitionError):
        merge(gen, 3)  # type: ignore[call-overload] # untyped callers
    assert taken == []
    assert list(gen) == [0, 1, 2]


def test_merge_refuses_an_async_source_when_called() -> None:
    async def numbers() -> AsyncIterator[int]:
        for i in range(3):
            yield i

    untyped: object = numbers()  # merge is typed for iterables; untyped callers may pass this
    with pytest.raises(DefinitionError, match="merge source 1 is the async iterable"):
        merge([10, 11], untyped)  # type: ignore[call-overload] # untyped callers


# -- options ----------------------------------------------------------------------------


def test_a_bad_rate_is_described_as_calls_per_second() -> None:
    with pytest.raises(DefinitionError, match=r"rate=0 is not allowed; .*calls per second") as e:
        stage(rate=0)
    assert "seconds as a number" not in str(e.value)


def test_a_backoff_above_max_backoff_is_refused() -> None:
    with pytest.raises(DefinitionError, match=r"backoff=5 is more than max_backoff=1"):
        stage(backoff=5, max_backoff=1)
    assert stage(backoff=1, max_backoff=1)(length)("ab") == 2  # equal is fine


@pytest.mark.parametrize(
    ("backend", "most"), [("thread", 10_000), ("process", 1_024), ("task", 100_000)]
)
def test_more_workers_than_a_backend_can_start_are_refused_at_definition(
    backend: Backend, most: int
) -> None:
    stage(workers=most, backend=backend)  # the most is allowed
    with pytest.raises(DefinitionError, match=f"workers={most + 1} is more than a {backend} stage"):
        stage(workers=most + 1, backend=backend)


# -- what the shapes make and take, checked at composition --------------------------


def loose(fn: Callable[..., object]) -> Any:
    """A stage as an untyped caller holds it: only the run-time check stands guard
    (mypy and pyright reject every bad composition below on their own)."""
    return stage(fn)


def text_length(word: str) -> int:
    return len(word)


def spelled(n: int) -> str:
    return str(n)


def count_items(items: list[int]) -> int:
    return len(items)


def anything(value: object) -> object:
    return value


@pytest.mark.parametrize(
    ("compose", "message"),
    [
        (lambda: loose(text_length).batch(3) | loose(shout), "'batch(3)' produces list"),
        (
            lambda: fork(loose(text_length), loose(shout)) | loose(spelled),
            "produces tuple but 'spelled' accepts int",
        ),
        (lambda: loose(text_length).unbatch(), "'text_length' produces int but 'unbatch'"),
        (
            lambda: fork(loose(text_length), loose(spelled)),
            "the fork branches 'text_length' and 'spelled' take the same items",
        ),
        (
            lambda: route(bool, loose(text_length), loose(spelled)),
            "the route branches 'text_length' and 'spelled' take the same items",
        ),
        (
            lambda: loose(text_length) | fork(loose(anything), loose(shout)),
            "'text_length' produces int but 'fork(anything, shout)' accepts str",
        ),
    ],
)
def test_the_shapes_types_are_checked_when_composed(
    compose: Callable[[], object], message: str
) -> None:
    with pytest.raises(CompositionError, match=re.escape(message)):
        compose()


def decoded(text: str) -> Any:
    return text


def logged(value: Any) -> None:
    pass


def key_of(value: int | str) -> str:
    return str(value)


def size_of(value: str | bytes) -> int:
    return len(value)


def test_shapes_that_fit_compose() -> None:
    fitting = [
        loose(text_length).batch(3) | loose(count_items),
        loose(text_length).batch(2).unbatch() | loose(spelled),
        loose(spelled) | fork(loose(anything), loose(text_length)) | loose(anything),
        route(bool, loose(anything), loose(text_length)),
        # Any stands for anything, on either side (it is a class since Python 3.11).
        loose(text_length) | loose(logged),
        loose(decoded) | loose(shout),
        flat_map(decoded),
        # Branches whose inputs overlap take the items both accept.
        fork(loose(key_of), loose(size_of)),
        route(bool, loose(key_of), loose(size_of)),
    ]
    assert len(fitting) == 9


def test_keep_type_produces_its_class_for_the_run_time_check() -> None:
    with pytest.raises(CompositionError, match=re.escape("'keep_type(int)' produces int but")):
        _ = keep_type(int) | loose(shout)


UNGUARDED = """
from typeflow import stage


@stage(backend="process")
def square(n: int) -> int:
    return n * n


for result in square.run([3]):  # no main guard: a spawned worker runs this again
    print(result)
"""


@pytest.mark.timeout(120)
def test_a_script_without_the_main_guard_gets_an_error_that_names_it(tmp_path: Path) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED)
    done = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "TYPEFLOW_START_METHOD": "spawn"},
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    # The worker's import of the script refuses the run it would start...
    assert "DefinitionError" in done.stderr
    assert "start runs under 'if __name__ == \"__main__\":'" in done.stderr
    # ...so the worker never starts, and the item fails saying why.
    assert "WorkerStartError" in done.stdout
    assert "guard" in done.stdout
    assert done.returncode == 0


FROM_STDIN = """
import threading

from typeflow import stage

threading.Thread(target=threading.Event().wait, args=(30,), daemon=True).start()


@stage(workers=2, backend="process")  # another thread is alive: the forkserver starts them
def square(n: int) -> int:
    return n * n


print([r.unwrap() for r in square.run([1, 2, 3])])
"""


@pytest.mark.timeout(120)
def test_process_stages_work_in_a_script_read_from_standard_input() -> None:
    # Its __file__ is "<stdin>": a worker cannot import it again (it failed to start,
    # again and again); its stages travel by value, as for python -c.
    done = subprocess.run(
        [sys.executable, "-"],
        input=FROM_STDIN,
        env={**os.environ, "TYPEFLOW_START_METHOD": "forkserver"},
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.stdout.strip() == "[1, 4, 9]", done.stderr
    assert "Traceback" not in done.stderr


class Lookup:
    def __call__(self, key: str) -> int:
        return len(key)


class Parser:
    def parse(self, text: str) -> int:
        return int(text)


def test_newcomers_mistakes_get_the_fix_in_the_message() -> None:
    # An object with __call__ is named after its class, not its address.
    assert stage(Lookup()).name == "Lookup"
    # A method in a class body: the fix is a bound method or a staticmethod.
    with pytest.raises(DefinitionError, match=r"bound method \(stage\(Parser\(\)\.parse\)\)"):
        stage(Parser.parse)  # type: ignore[arg-type] # caught statically too
    assert stage(Parser().parse)("7") == 7
    # An option given positionally.
    with pytest.raises(DefinitionError, match=r"not 4; the options are keywords"):
        stage(4)  # type: ignore[call-overload] # untyped callers are what this checks
