"""The memory sampler of ``harness.MemorySampler``, in a process of its own.

``python memory_sampler.py PID INTERVAL_S pss|rss``: samples the RSS (and PSS)
of process PID and all its descendants except itself every INTERVAL_S seconds.
It prints ``ready`` after the first sample (the start values); when it reads a
``stop`` line it takes a last sample and prints the start and peak values as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading

import psutil


def _pss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main(pid: int, interval_s: float, pss: bool) -> None:
    me = os.getpid()
    root = psutil.Process(pid)
    procs: list[psutil.Process] = [root]

    def refresh() -> None:
        nonlocal procs
        try:
            procs = [root, *(c for c in root.children(recursive=True) if c.pid != me)]
        except psutil.Error:
            procs = [root]

    def sample() -> tuple[int, int]:
        rss = 0
        for proc in procs:
            with contextlib.suppress(psutil.Error):  # it ended meanwhile
                rss += proc.memory_info().rss
        return rss, sum(_pss_of(p.pid) for p in procs) if pss else 0

    stop = threading.Event()

    def wait_for_stop() -> None:
        # A "stop" line, not the end of stdin: processes forked by the measured
        # program inherit the write end of this pipe and may keep it open.
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        stop.set()

    threading.Thread(target=wait_for_stop, daemon=True).start()
    rss_start, pss_start = sample()
    rss_peak, pss_peak = rss_start, pss_start
    print("ready", flush=True)
    tick = 0
    while True:
        stopping = stop.wait(interval_s)
        if tick % 10 == 0 or stopping:  # walking the process table costs about 1 ms
            refresh()
        tick += 1
        rss, pss_now = sample()
        rss_peak, pss_peak = max(rss_peak, rss), max(pss_peak, pss_now)
        if stopping:
            break
    result = {"rss_start": rss_start, "rss_peak_growth": rss_peak - rss_start}
    if pss:
        result["pss_peak_growth"] = pss_peak - pss_start
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "pss")
