"""Real signals to a real program: the first drains, the second cancels; nothing survives."""

from __future__ import annotations

import gc
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from typeflow import stage

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "signal_me.py"

pytestmark = pytest.mark.timeout(90)


def run_and_signal(*signals: signal.Signals) -> tuple[int, dict[str, int]]:
    """Start the script, send ``signals`` once it runs; return its status and its report."""
    child = subprocess.Popen(
        [sys.executable, str(SCRIPT)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "running"
        descendants = psutil.Process(child.pid).children(recursive=True)
        for i, signum in enumerate(signals):
            if i:  # signals are not queued: let the run handle the previous one first
                for _ in range(2):
                    assert child.stdout.readline().strip() == "result"
            child.send_signal(signum)
        out, err = child.communicate(timeout=60)
        _, alive = psutil.wait_procs(descendants, timeout=10)
        assert not alive, f"processes outlived the run: {alive}"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    report = re.search(r"read=(\d+) yielded=(\d+) in_flight=(\d+)", out)
    assert report, f"no report; stdout={out!r} stderr={err[-2000:]!r}"
    read, yielded, in_flight = map(int, report.groups())
    return child.returncode, {"read": read, "yielded": yielded, "in_flight": in_flight}


def test_first_ctrl_c_drains_what_was_read_then_interrupts() -> None:
    status, report = run_and_signal(signal.SIGINT)
    assert status == 128 + signal.SIGINT or status == -signal.SIGINT  # KeyboardInterrupt
    assert report["in_flight"] == 0
    assert report["yielded"] == report["read"] > 2


def test_second_ctrl_c_cancels_at_once() -> None:
    status, report = run_and_signal(signal.SIGINT, signal.SIGINT)
    assert status == 128 + signal.SIGINT or status == -signal.SIGINT
    assert report["in_flight"] > 0  # items that were read were dropped, not waited for


def test_sigterm_drains_then_exits_with_143() -> None:
    status, report = run_and_signal(signal.SIGTERM)
    assert status == 128 + signal.SIGTERM
    assert report["in_flight"] == 0
    assert report["yielded"] == report["read"]


# -- runs left early give the signals back --------------------------------------------------


def plus_one(n: int) -> int:
    return n + 1


def first_of(run: Iterator[object]) -> object:
    for result in run:
        return result  # leaves the loop early: the run is dropped and collected
    return None


def test_a_run_left_by_break_or_return_gives_the_signals_back() -> None:
    # pytest runs tests in the main thread, where a run takes SIGINT and SIGTERM.
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    for _ in range(3):
        for _result in stage(plus_one).run(range(10)):
            break
        gc.collect()
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    first_of(stage(plus_one).run(range(10)))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_runs_that_end_out_of_order_give_the_signals_back() -> None:
    before = signal.getsignal(signal.SIGINT)
    short, long = stage(plus_one).run(range(3)), stage(plus_one).run(range(5))
    for _ in zip(short, long, strict=False):  # the first run ends, the second is left
        pass
    del short, long
    gc.collect()
    assert signal.getsignal(signal.SIGINT) == before
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C interrupts again


def test_a_stale_handler_passes_the_signal_on() -> None:
    # A run shut down outside the main thread cannot give the signals back there;
    # a signal that reaches its handler goes where it would have gone.
    run = stage(plus_one).run(range(5))
    next(run)
    closer = threading.Thread(target=run.close)
    closer.start()
    closer.join()
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_during_a_run_s_stop_waits_for_the_teardowns() -> None:
    # Ctrl-C while a break or close() joins the workers went to the handlers the
    # run had given back first: a KeyboardInterrupt in the join, teardowns skipped.
    from typeflow._runtime._signals import SignalGuard

    before = signal.getsignal(signal.SIGINT)
    guard = SignalGuard(lambda: None, lambda: None, 10.0)
    assert guard.install()
    guard.stopping()
    signal.raise_signal(signal.SIGINT)  # waits: the workers are being joined
    assert signal.getsignal(signal.SIGINT) == guard._handle  # pyright: ignore[reportPrivateUsage] - the handler under test
    with pytest.raises(KeyboardInterrupt):
        guard.retire()  # joined: the signal goes to the handler it had replaced
    assert signal.getsignal(signal.SIGINT) == before
