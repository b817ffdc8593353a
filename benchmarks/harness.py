"""What one child process does: time one cell once (or calibrate its size).

The child imports the peer before the clock starts (import time is its own case),
optionally times the plain serial loop over the same stages (the *paired* baseline),
runs the pipeline once over a lazy generator while a consumer counts and sums the
outputs, times the serial loop again, and returns raw numbers only.  Derived metrics
are computed by the parent (``metrics.py``) so the raw JSON stays the source of truth.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from peers import RUNNERS, import_pypeln, serial_loop
from suite import Case
from workloads import cpu_burn, ints

CALIBRATION_FIRST_N = 256
CALIBRATION_MIN_S = 0.25


class Sink:
    """The consumer: counts outputs and keeps an order-independent checksum."""

    __slots__ = ("count", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total: float = 0

    def add(self, x: Any) -> None:
        self.count += 1
        self.total += x


class SlowSink(Sink):
    """A consumer slower than the pipeline: sleeps 0.5 ms every 100 items."""

    __slots__ = ()

    def add(self, x: Any) -> None:
        self.count += 1
        self.total += x
        if self.count % 100 == 0:
            time.sleep(0.0005)


class MemorySampler:
    """Peak RSS (psutil) and PSS (``/proc/PID/smaps_rollup``) of this process + children.

    The sampling runs in a separate process (``memory_sampler.py``), not in a
    thread of the measured one: a thread would take the GIL from the peer under
    test, and it would make the process multi-threaded, which changes what a
    library may safely do (typeflow forks its first workers directly only while
    the caller runs a single thread, as forking a threaded process is unsafe).
    RSS summed over a forked tree counts the parent's pages once per child that
    maps them, so the PSS sum, which splits shared pages between their users, is
    kept too.  Start and stop are synchronised on the sampler's pipe: the run
    starts after its first sample, and the result is its last one.
    """

    def __init__(self, pss: bool, interval_s: float) -> None:
        self._argv = [
            sys.executable,
            str(Path(__file__).with_name("memory_sampler.py")),
            str(os.getpid()),
            str(interval_s),
            "pss" if pss else "rss",
        ]
        self._proc: subprocess.Popen[str] | None = None
        self._result: dict[str, float] = {}

    def __enter__(self) -> MemorySampler:
        self._proc = subprocess.Popen(
            self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self._proc.stdout is not None
        ready = self._proc.stdout.readline()  # after its first (start) sample
        if ready.strip() != "ready":
            raise RuntimeError(f"the memory sampler did not start: {ready!r}")
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        proc = self._proc
        assert proc is not None
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write("stop\n")  # the sampler takes a last sample and reports
        proc.stdin.flush()
        self._result = json.loads(proc.stdout.readline())
        proc.stdin.close()
        proc.wait()

    def result(self) -> dict[str, float]:
        return self._result


def preload(case: Case, peer: str) -> None:
    """Import the peer's package (and NumPy for array items) before any timing."""
    if case.source == "arrays":
        import numpy  # noqa: F401 - imported here so that timing excludes it
    if peer == "typeflow":
        import typeflow  # noqa: F401 - imported here so that timing excludes it

        # typeflow imports a backend on its first use (thread and task users never
        # load multiprocessing); the peers' own modules (multiprocessing.pool,
        # concurrent.futures) are imported by peers.py before any timing, so
        # typeflow's are too.
        for backend in {st.backend for st in case.stages} & {"thread", "process", "task"}:
            importlib.import_module(f"typeflow._backends._{backend}")
    elif peer == "pypeln":
        import_pypeln()
    elif peer == "joblib":
        import joblib  # noqa: F401 - imported here so that timing excludes it
    elif peer == "mpire":
        import mpire  # noqa: F401 - imported here so that timing excludes it


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def paired_serial(case: Case) -> dict[str, float]:
    """Seconds per item of the serial chain (and, for mixed, of stage B alone)."""
    n = max(case.n_pair, 1)
    out = {"serial_item_s": _timed(lambda: serial_loop(case.stages, ints(n), Sink().add)) / n}
    if case.paired == "mixed":
        nb = 5 * n
        out["b_item_s"] = _timed(lambda: [cpu_burn(i) for i in range(nb)]) / nb
    return out


def run_once(case: Case, peer: str, n: int) -> tuple[float, Sink, dict[str, float]]:
    """Run the pipeline once over ``n`` fresh items; return wall time, sink, memory."""
    runner = RUNNERS[peer]
    sink: Sink = SlowSink() if case.slow_consumer else Sink()
    items = case.items(n)
    if not case.sample_memory:
        return _timed(lambda: runner(case.stages, items, sink.add)), sink, {}
    with MemorySampler(case.pss, 0.02 if case.pss else 0.01) as sampler:
        wall = _timed(lambda: runner(case.stages, items, sink.add))
    return wall, sink, sampler.result()


def measure(case: Case, peer: str, n: int) -> dict[str, Any]:
    """One repeat of one cell, with its paired serial baselines around it."""
    preload(case, peer)
    before = paired_serial(case) if case.paired != "none" else {}
    cpu0 = os.times()
    wall, sink, memory = run_once(case, peer, n)
    cpu1 = os.times()
    after = paired_serial(case) if case.paired != "none" else {}
    result: dict[str, Any] = {
        "status": _status(case, n, sink),
        "n": n,
        "count": sink.count,
        "checksum": sink.total,
        "wall_s": wall,
        "cpu_s": (cpu1.user + cpu1.system + cpu1.children_user + cpu1.children_system)
        - (cpu0.user + cpu0.system + cpu0.children_user + cpu0.children_system),
        **memory,
    }
    for key in before:
        result[f"{key}_before"] = before[key]
        result[f"{key}_after"] = after[key]
    return result


def _status(case: Case, n: int, sink: Sink) -> str:
    if sink.count != n:
        return "bad_count"
    if case.expected is not None and sink.total != case.expected(n):
        return "bad_checksum"
    return "ok"


def calibrate(case: Case, peer: str, n_max: int) -> dict[str, Any]:
    """Estimate the marginal seconds per item of a cell.

    Runs ``n`` = 256, 2048, ... (8x each time) until a run takes ``CALIBRATION_MIN_S``
    or ``n`` reaches ``n_max``, at least two sizes, and takes the slope between the
    last two runs, so a slow start-up is not mistaken for a slow item.
    """
    preload(case, peer)
    points: list[tuple[int, float]] = []
    n = min(CALIBRATION_FIRST_N, n_max)
    while True:
        wall, sink, _ = run_once(case, peer, n)
        if sink.count != n:
            return {"status": "bad_count", "n": n, "count": sink.count, "wall_s": wall}
        points.append((n, wall))
        if n >= n_max or (len(points) >= 2 and wall >= CALIBRATION_MIN_S):
            break
        n = min(n * 8, n_max)
    return {"status": "ok", "n": n, "wall_s": wall, "item_s": _slope(points)}


def _slope(points: list[tuple[int, float]]) -> float:
    """Seconds per extra item between the last two runs (mean cost if that is noise)."""
    n, wall = points[-1]
    if len(points) >= 2:
        n0, wall0 = points[-2]
        if wall > wall0 and n > n0:
            return max((wall - wall0) / (n - n0), wall / n / 10)
    return wall / n
