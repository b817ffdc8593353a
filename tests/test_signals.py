"""Real signals to a real program: the first drains, the second cancels; nothing survives."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

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
