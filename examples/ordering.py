"""Ordered and unordered runs, and the window that bounds memory.

Run it from the repository root::

    uv run examples/ordering.py

Forty items go through four thread workers; item 0 takes half a second, the
others 10 ms.  An ordered run (the default) cannot yield anything before item 0
is done, and with ``window=8`` it stops reading the input after 8 items in
flight: memory stays bounded, at the cost of head-of-line blocking.  An
unordered run yields every item as soon as it is finished.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from typeflow import stage

SLOW_ITEM = 0


@stage(workers=4)
def process(item: int) -> int:
    """Pretend work: slow for one item, quick for every other."""
    time.sleep(0.5 if item == SLOW_ITEM else 0.01)
    return item


def numbered_items(count: int, taken: list[int]) -> Iterator[int]:
    """Yield ``0 .. count-1``, recording in ``taken`` each item the run reads."""
    for item in range(count):
        taken.append(item)
        yield item


def demonstrate(*, ordered: bool) -> None:
    """Run the forty items once and report what came out when."""
    taken: list[int] = []
    started = time.perf_counter()
    arrival: list[int] = []
    read_at_first_result = 0
    first_after = 0.0
    for result in process.run(numbered_items(40, taken), ordered=ordered, window=8):
        if not arrival:
            first_after = time.perf_counter() - started
            read_at_first_result = len(taken)
        arrival.append(result.unwrap())
    label = "ordered  " if ordered else "unordered"
    print(
        f"{label} first result after {first_after:.2f} s, when {read_at_first_result} items "
        f"had been read; all 40 after {time.perf_counter() - started:.2f} s"
    )
    shown = ", ".join(map(str, arrival[:12]))
    print(f"          arrival order: {shown}, ...")
    print(f"          item {SLOW_ITEM} came out in position {arrival.index(SLOW_ITEM) + 1}")


def main() -> None:
    demonstrate(ordered=True)
    demonstrate(ordered=False)


if __name__ == "__main__":
    main()
