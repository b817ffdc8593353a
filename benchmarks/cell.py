"""Child entry point: ``python benchmarks/cell.py SPEC_JSON RESULT_PATH``.

Runs one cell once (``mode`` "measure") or sizes it (``mode`` "calibrate") and writes
one JSON object to RESULT_PATH.  Any exception becomes ``{"status": "error"}`` with
the traceback's tail; a hang is the parent's business (it kills the process group).
Threads and processes still alive afterwards are recorded, then the child leaves with
``os._exit`` so that a peer's stuck shutdown shows up in the data, not as a 60 s wait.
The result goes to a file, not stdout, so peers that print, and grandchildren that
keep stdout open, cannot corrupt it or delay the parent.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any


def main(spec_json: str, result_path: str) -> None:
    spec: dict[str, Any] = json.loads(spec_json)
    try:
        result = run(spec)
    except BaseException as exc:  # noqa: BLE001 - every failure is a result
        tail = "".join(traceback.format_exception(exc)[-6:])
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": tail}
    result.update(leftovers())
    with open(result_path, "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # an interpreter exit that waits on a peer's leftovers must not cost 60 s


def leftovers() -> dict[str, Any]:
    """Threads and child processes still alive after the pipeline returned."""
    import threading

    import psutil

    threads = [
        t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()
    ]
    children = []
    for child in psutil.Process().children(recursive=True):
        try:
            children.append(" ".join(child.cmdline()[1:])[:120])
        except psutil.Error:
            children.append("(gone)")
    return {"leftover_threads": threads, "leftover_children": children}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from harness import calibrate, measure
    from suite import find_case

    case = find_case(spec["workload"], spec["case"], spec["quick"])
    if spec["mode"] == "calibrate":
        return calibrate(case, spec["peer"], spec["n"])
    return measure(case, spec["peer"], spec["n"])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
