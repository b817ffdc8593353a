"""Per-item cost of one pipeline, with what it costs the parent process.

A quick probe for one change at a time, next to the full benchmark
(``run.py``): it runs ``x+1`` through ``--stages`` chained stages of 2 workers
over a generator of ``--n`` items, three times, and prints for each run the
wall time per item, the parent's CPU time per item, the CPU time per item of
the worker processes (those that ended during the run), the voluntary context
switches per thousand items (each is a sleep and a wake-up) and how often the
garbage collector ran.  To compare two versions, run it alternately against
each checkout, one after the other, several times (this machine moves by
±10-30 % between runs)::

    uv run python benchmarks/probe.py thread
    PYTHONPATH=<other checkout>/src uv run python benchmarks/probe.py thread

``--shape`` puts one more shape after the stages (``--stages 0``: the shape
alone), with 2 workers where it has workers: ``flat`` (a ``flat_map`` making
``[x, x]``), ``opt`` (a ``flat_map`` making ``[x]``, or nothing for one number
in four: a filter and a map in one), ``keep`` (even numbers), ``flat-map``,
``opt-map`` and ``keep-map`` (the same, then ``x+1``: the path of a stage
behind a one-to-many stage or a filter),
``fork`` (``fork(x+1, 2x)`` then their sum) or ``batch`` (``batch(100)`` then
``unbatch()``); figures are then per input item.

``--items`` sends other values than ints through the stages, which then pass
each value on as it is: ``str`` (URLs of 25-30 characters), ``bytes`` (about 10
bytes), ``tuple`` (pairs), ``dict`` (two keys).
"""

from __future__ import annotations

import argparse
import functools
import gc
import operator
import resource
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, cast

from workloads import adbl, ainc, dbl, inc

import typeflow
from typeflow._options import DEFAULT_BUFFER


def _items(n: int) -> Iterator[int]:
    yield from range(n)


#: What ``--items`` sends, by the position of the item.
ITEMS: dict[str, Callable[[int], object]] = {
    "str": lambda i: f"https://example.org/item/{i}",
    "bytes": lambda i: b"item-%d" % i,
    "tuple": lambda i: (i, "x"),
    "dict": lambda i: {"id": i, "name": "x"},
}


def same(x: object) -> object:
    return x


async def asame(x: object) -> object:
    return x


def twice(x: int) -> list[int]:
    return [x, x]


async def atwice(x: int) -> AsyncIterator[int]:
    yield x
    yield x


def maybe(x: int) -> list[int]:
    return [x] if x % 4 else []


async def amaybe(x: int) -> AsyncIterator[int]:
    if x % 4:
        yield x


def is_even(x: int) -> bool:
    return x % 2 == 0


def add(pair: tuple[int, int]) -> int:
    return pair[0] + pair[1]


def _shape(name: str, backend: str) -> typeflow.Stage[Any, Any] | typeflow.Pipeline[Any, Any]:
    """The ``--shape`` after the stages (see the module's docstring)."""
    on = cast("typeflow.Backend", backend)
    if name.endswith("-map"):  # the shape, then x+1 behind it
        plus_one = typeflow.stage(workers=2, backend=on)(ainc if on == "task" else inc)
        return _shape(name.removesuffix("-map"), backend) | plus_one
    if name == "flat":
        if on == "task":
            return typeflow.flat_map(workers=2, backend=on)(atwice)
        return typeflow.flat_map(workers=2, backend=on)(twice)
    if name == "opt":
        if on == "task":
            return typeflow.flat_map(workers=2, backend=on)(amaybe)
        return typeflow.flat_map(workers=2, backend=on)(maybe)
    if name == "keep":
        return typeflow.keep(is_even, workers=2, backend="thread" if on == "task" else on)
    if name == "fork":
        adder = typeflow.stage(workers=2, backend="thread" if on == "task" else on)(add)
        if on == "task":
            a, b = (
                typeflow.stage(workers=2, backend=on)(ainc),
                typeflow.stage(workers=2, backend=on)(adbl),
            )
            return typeflow.fork(a, b) | adder
        c, d = (
            typeflow.stage(workers=2, backend=on)(inc),
            typeflow.stage(workers=2, backend=on)(dbl),
        )
        return typeflow.fork(c, d) | adder
    return typeflow.batch(100) | typeflow.unbatch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backend", choices=["thread", "process", "task"])
    parser.add_argument("--n", type=int, default=300_000, help="items per run")
    parser.add_argument("--stages", type=int, default=1, help="chained stages")
    parser.add_argument(
        "--shape",
        choices=["flat", "opt", "keep", "flat-map", "opt-map", "keep-map", "fork", "batch"],
        default=None,
        help="a shape after them",
    )
    parser.add_argument("--buffer", type=int, default=None, help="each stage's buffer")
    parser.add_argument("--timeout", type=float, default=None, help="each stage's timeout")
    parser.add_argument("--retries", type=int, default=0, help="each stage's retries")
    parser.add_argument(
        "--coroutine", action="store_true", help="x+1 as async def on thread and process stages"
    )
    parser.add_argument(
        "--items", choices=sorted(ITEMS), default=None, help="values other than ints, passed on"
    )
    args = parser.parse_args()
    buffer: int = DEFAULT_BUFFER if args.buffer is None else args.buffer
    timeout: float | None = args.timeout
    retries: int = args.retries
    stages: list[typeflow.Stage[Any, Any]]
    passed = args.items is not None
    if args.backend == "task":
        stages = [
            typeflow.stage(
                workers=2, backend="task", buffer=buffer, timeout=timeout, retries=retries
            )(asame if passed else ainc)
        ] * args.stages
    else:
        on = cast("typeflow.Backend", args.backend)
        decorate = typeflow.stage(
            workers=2, backend=on, buffer=buffer, timeout=timeout, retries=retries
        )
        if passed:
            stages = [decorate(asame) if args.coroutine else decorate(same)] * args.stages
        else:
            stages = [decorate(ainc) if args.coroutine else decorate(inc)] * args.stages
    parts: list[Any] = list(stages)
    if args.shape is not None:
        parts.append(_shape(args.shape, args.backend))
    pipeline = functools.reduce(operator.or_, parts)
    make = ITEMS[args.items] if passed else None
    list(pipeline.run(range(100) if make is None else map(make, range(100))))  # start-up
    n = args.n
    for _ in range(3):
        gc_before = [g["collections"] for g in gc.get_stats()]
        used = resource.getrusage(resource.RUSAGE_SELF)
        used_children = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        for result in pipeline.run(_items(n) if make is None else map(make, _items(n))):
            result.unwrap()
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
        children = sum(
            getattr(after_children, f) - getattr(used_children, f) for f in ("ru_utime", "ru_stime")
        )
        cpu = after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime
        switches = after.ru_nvcsw - used.ru_nvcsw
        collections = [g["collections"] - b for g, b in zip(gc.get_stats(), gc_before, strict=True)]
        print(
            f"{args.backend} x{args.stages}: {1e6 * wall / n:.2f} µs/item, "
            f"parent CPU {1e6 * cpu / n:.2f} µs/item, "
            f"worker processes' CPU {1e6 * children / n:.2f} µs/item, "
            f"{1000 * switches / n:.1f} sleeps per 1000 items, "
            f"collections by generation {collections}"
        )


if __name__ == "__main__":
    main()
