"""Runs an endless process-backed pipeline until interrupted; used by test_interrupt.py.

Prints ``running`` once results flow, then ``interrupted`` and exits with 130
when KeyboardInterrupt reaches it.
"""

from __future__ import annotations

import itertools
import sys
import time

from typeflow import stage


def slow_square(x: int) -> int:
    time.sleep(0.001)
    return x * x


def main() -> int:
    squares = stage(workers=2, backend="process")(slow_square)
    pipeline = squares | stage(workers=2)(slow_square)
    try:
        for i, _ in enumerate(pipeline.run(itertools.count())):
            if i == 20:
                print("running", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
