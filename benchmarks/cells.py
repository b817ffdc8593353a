"""Parent side: run one cell in a fresh child process under a hard time limit.

Each child starts in its own session (so its own process group).  If it has not
finished after ``timeout_s``, the whole group (the child, its pools, loky workers,
pypeln's manager) gets SIGKILL and the repeat is recorded as ``HANG``.  After a
normal exit the group is killed too, so a peer's stray worker cannot leak into the
next cell.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

#: Measures one import in an interpreter that has imported nothing else.
IMPORT_SNIPPET = """
import importlib, importlib.metadata, json, sys, time, types
name, path = sys.argv[1], sys.argv[2]
try:
    import pkg_resources
except ImportError:  # pypeln's stopit needs it; stub it as peers.import_pypeln does
    stub = types.ModuleType("pkg_resources")
    stub.get_distribution = lambda d: types.SimpleNamespace(version=importlib.metadata.version(d))
    sys.modules["pkg_resources"] = stub
t0 = time.perf_counter()
try:
    importlib.import_module(name)
    result = {"status": "ok", "n": 0, "count": 0, "wall_s": time.perf_counter() - t0}
except BaseException as exc:
    result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
with open(path, "w") as f:
    json.dump(result, f)
"""


@dataclass(frozen=True)
class Cell:
    """One (case, peer) pair, with the number of items its repeats use."""

    workload: str
    case: str
    peer: str
    n: int
    quick: bool

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.workload, self.case, self.peer)


def run_cell(
    cell: Cell, mode: str, timeout_s: float, import_module: str | None = None
) -> dict[str, Any]:
    """Run ``cell`` once in a fresh child; return its result with the child's wall time."""
    with tempfile.TemporaryDirectory(prefix="typeflow-bench-") as tmp:
        result_path = Path(tmp) / "result.json"
        if import_module is not None:
            argv = [sys.executable, "-c", IMPORT_SNIPPET, import_module, str(result_path)]
        else:
            spec = json.dumps({**asdict(cell), "mode": mode})
            argv = [sys.executable, str(HERE / "cell.py"), spec, str(result_path)]
        t0 = time.perf_counter()
        outcome = _spawn(argv, Path(tmp), timeout_s)
        child_s = time.perf_counter() - t0
        result = _read_result(result_path, outcome, Path(tmp))
    result["child_s"] = child_s
    return result


def _spawn(argv: list[str], tmp: Path, timeout_s: float) -> str:
    """Run ``argv`` in a new process group; ``"hang"`` if it outlives ``timeout_s``."""
    env = {**os.environ, "PYTHONPATH": _pythonpath(), "PYTHONUNBUFFERED": "1"}
    # Cache bytecode as on any machine after the first import (run.compile_bytecode).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    with open(tmp / "stdout", "wb") as out, open(tmp / "stderr", "wb") as err:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            cwd=HERE.parent,
            env=env,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout_s)
            outcome = "exit" if code == 0 else f"exit code {code}"
        except subprocess.TimeoutExpired:
            outcome = "hang"
        _kill_group(proc)
    return outcome


def _pythonpath() -> str:
    """Put ``benchmarks/`` first, so workers that spawn fresh interpreters find our modules."""
    rest = os.environ.get("PYTHONPATH")
    return str(HERE) if not rest else f"{HERE}{os.pathsep}{rest}"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _read_result(path: Path, outcome: str, tmp: Path) -> dict[str, Any]:
    if outcome == "hang":
        return {
            "status": "HANG",
            "error": "killed after the time limit",
            "stderr": _tail(tmp / "stderr"),
        }
    try:
        with open(path) as f:
            result: dict[str, Any] = json.load(f)
    except (OSError, json.JSONDecodeError):
        return {
            "status": "error",
            "error": f"child died ({outcome}) without a result",
            "stderr": _tail(tmp / "stderr"),
        }
    if result.get("status") != "ok":
        result["stderr"] = _tail(tmp / "stderr")
    return result


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""
