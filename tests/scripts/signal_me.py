"""A slow endless process-backed run that reports how it ended; used by test_signals.py.

Prints ``running`` once results flow, then ``result`` for each further one; when
the run ends it prints ``read=<items read> yielded=<results yielded> in_flight=<the rest>``.
"""

from __future__ import annotations

import itertools
import sys
import time

from typeflow import stage


def slow(x: int) -> int:
    time.sleep(0.3)
    return x


def main() -> int:
    pipeline = stage(workers=2, backend="process", buffer=4)(slow)
    run = pipeline.run(itertools.count(), grace=30)
    yielded = 0
    try:
        for _ in run:
            yielded += 1
            if yielded == 2:
                print("running", flush=True)
            elif yielded > 2:
                print("result", flush=True)
    finally:
        stats = run.statistics()
        print(f"read={stats.items_read} yielded={yielded} in_flight={stats.in_flight}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
