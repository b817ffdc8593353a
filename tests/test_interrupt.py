"""Ctrl-C during a process-backed run, delivered as a real signal to a real program."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "interrupt_me.py"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("whole_group", [False, True], ids=["process", "process-group"])
def test_ctrl_c_stops_a_process_backed_run_and_leaves_no_process(whole_group: bool) -> None:
    child = subprocess.Popen(
        [sys.executable, str(SCRIPT)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, like a program in a terminal
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "running"
        descendants = psutil.Process(child.pid).children(recursive=True)
        assert descendants, "the run should have started worker processes"
        if whole_group:
            os.killpg(child.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        else:
            child.send_signal(signal.SIGINT)
        rest, _ = child.communicate(timeout=20)
        assert "interrupted" in rest
        assert child.returncode == 130
        _, alive = psutil.wait_procs(descendants, timeout=10)
        assert not alive, f"processes outlived the run: {alive}"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
