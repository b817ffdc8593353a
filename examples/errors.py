"""Failures are values: reading them, failing fast, stopping early, bad input.

Run it from the repository root::

    uv run examples/errors.py

A small order-pricing pipeline meets malformed lines, unknown products, a
worker process that dies, an input file that breaks half-way and an impatient
caller.  Each section prints what typeflow does about it.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from returns.pipeline import is_successful

from typeflow import Pipeline, RemoteTraceback, StageError, WorkerCrashed, stage

PRICES: Final[dict[str, float]] = {"apple": 0.40, "bread": 2.10, "cheese": 5.75, "dates": 3.20}

#: An order line whose product makes the pricing worker process exit on the spot,
#: the way a segfault or the out-of-memory killer would.
POISON: Final = "poison"

ORDER_LINES: Final = [
    "apple,12",
    "bread,2",
    "cheese,one",  # not a number: parse fails
    "dates,3",
    "caviar,1",  # unknown product: price fails in a worker process
    "apple,5",
]


@dataclass(frozen=True)
class Order:
    """One parsed order line."""

    product: str
    quantity: int


@stage(workers=2)
def parse(line: str) -> Order:
    """``"apple,12"`` -> ``Order("apple", 12)``."""
    product, quantity = line.split(",")
    return Order(product.strip(), int(quantity))


@stage(workers=2, backend="process")
def price(order: Order) -> float:
    """The order's total price, computed in a worker process."""
    if order.product == POISON:
        os._exit(1)  # the worker dies without a word
    return round(PRICES[order.product] * order.quantity, 2)


PRICING: Final[Pipeline[str, float]] = parse | price


def every_item_comes_out() -> None:
    print("1. Every input item comes out once, as a Success or a Failure, in input order")
    for line, result in zip(ORDER_LINES, PRICING.run(ORDER_LINES), strict=True):
        if is_successful(result):
            print(f"   {line:<12} ok      {result.unwrap():6.2f}")
        else:
            error = result.failure()
            print(
                f"   {line:<12} failed  in stage {error.stage!r} on {error.item!r}: "
                f"{type(error.exception).__name__}: {error.exception}"
            )


def worker_tracebacks() -> None:
    print("\n2. An exception from a worker process keeps the worker's traceback")
    error = next(PRICING.run(["caviar,1"])).failure()
    remote = error.exception.__cause__
    assert isinstance(remote, RemoteTraceback)
    print(f"   error.exception is {error.exception!r}, re-created in this process;")
    print("   its __cause__ is a RemoteTraceback with the worker's traceback as text:")
    frames = [line.strip() for line in remote.text.splitlines() if line.startswith("  File ")]
    where = re.sub(r'File ".*[/\\]', 'File "', frames[-1])
    print(f"     {where}   <- the line that raised, in the worker process")
    print("   traceback.print_exception(error.exception) prints it, then the exception")


def crashed_worker() -> None:
    print("\n3. A worker process that dies costs only the item it held")
    lines = ["apple,1", f"{POISON},1", "bread,1"]
    for line, result in zip(lines, PRICING.run(lines), strict=True):
        if is_successful(result):
            print(f"   {line:<10} ok      {result.unwrap():.2f}")
        else:
            crash = result.failure().exception
            assert isinstance(crash, WorkerCrashed)
            print(f"   {line:<10} failed  {crash}")
    print("   (the dead worker was replaced; the items after it were priced)")


def fail_fast() -> None:
    print("\n4. fail_fast=True raises the first failure that reaches the caller, and stops the run")
    try:
        for total in PRICING.run(ORDER_LINES, fail_fast=True):
            print(f"   got {total}")
    except StageError as error:
        print(f"   raised StageError: {error}")


def stop_early() -> None:
    print("\n5. Stopping early stops and joins every worker")
    before = threading.active_count(), len(multiprocessing.active_children())
    many_lines = [f"apple,{n}" for n in range(1, 100_000)]
    with PRICING.run(many_lines) as results:
        first_three = [next(results).unwrap() for _ in range(3)]
        running = threading.active_count(), len(multiprocessing.active_children())
    after = threading.active_count(), len(multiprocessing.active_children())
    print(f"   took the first three results {first_three} of {len(many_lines):,} and left")
    print(f"   threads, worker processes: before {before}, running {running}, after {after}")


def read_order_file() -> Iterator[str]:
    """Pretend to read an order file whose disk goes away after three lines."""
    yield from ORDER_LINES[:2]
    yield "dates,3"
    raise OSError("the order file became unreadable")


def input_fails() -> None:
    print("\n6. An exception from the input ends the run after the items read before it")
    try:
        for result in PRICING.run(read_order_file()):
            print(f"   got {result}")
    except OSError as error:
        print(f"   then the input's own exception: OSError: {error}")


def main() -> None:
    every_item_comes_out()
    worker_tracebacks()
    crashed_worker()
    fail_fast()
    stop_early()
    input_fails()


if __name__ == "__main__":
    main()
