"""typeflow's benchmark program: the same workloads through typeflow and its peers.

Usage::

    uv run --group bench python benchmarks/run.py [--quick] [--only WORKLOAD[,...]]
                                                  [--repeats N] [--timeout S]

Method (see README.md beside this file for what each workload measures):

* Every *cell* (workload case x peer) runs each repeat in a **fresh child process**,
  so pools, manager processes, loky executors and memory high-water marks never leak
  from one cell into the next.  The child gets a hard time limit (60 s by default);
  past it, its whole process group is killed and the repeat is recorded as ``HANG``,
  and the run goes on.
* Repeats go **round-robin** over all cells (repeat 1 of every cell, then repeat 2,
  ...), so load that drifts on a shared machine hits every peer alike.  Tables show
  medians; ``latest.json`` keeps every repeat.  Cells of a few milliseconds (start-up)
  run several fresh children per repeat (``Case.samples``), all in the median.
* Where the cost per item is the question (overhead, cpu, mixed), the child also
  times the plain **serial loop** over the same stages right before and right after
  the run.  The ratio of the two (``x serial (p)``) is *paired*: it cancels most of the
  drift between cells, and the typeflow/peer ratio is taken on it.
* Peers that are orders of magnitude slower would need minutes at the sizes the fast
  ones need; a **calibration** pass (one child per cell, before the repeats) times
  growing inputs and cuts each cell's N so a run takes about the case's time budget.
  Per-item metrics stay comparable.  The memory workload runs typeflow at exactly
  the nominal sizes.
* Items come from a lazy generator; the consumer counts and sums the outputs.  A
  count other than N is ``bad_count``, a wrong sum ``bad_checksum``.  Timings are
  reported, never asserted.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import multiprocessing
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cells import Cell, run_cell
from metrics import VIEWS, derive
from peers import IMPORT_MODULES
from report import build, markdown, plot
from suite import KNOWN_HANGS, WORKLOADS, Case, build_cases

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MIN_CALIBRATED_N = 500
VERSIONED = ("typeflow", "pypeln", "mpire", "joblib", "numpy", "returns", "cloudpickle")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes, 3 repeats (minutes)")
    p.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(WORKLOADS)}")
    p.add_argument("--peers", default="", help="comma-separated subset of peers")
    p.add_argument("--repeats", type=int, default=0, help="repeats per cell (3 quick, 5 full)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a HANG")
    p.add_argument(
        "--include-known-hangs",
        action="store_true",
        help="also run cells known to hang (each costs the full timeout)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="where latest.* are written")
    p.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="only rebuild latest.md and latest.png from a saved latest.json",
    )
    args = p.parse_args(argv)
    unknown = set(_csv(args.only)) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workload(s) {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
    return args


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


# --- planning and calibration -------------------------------------------------------------


def plan(
    cases: Sequence[Case], args: argparse.Namespace
) -> tuple[list[tuple[Case, Cell]], dict[tuple[str, str, str], str]]:
    """All cells to run, and the known hangs left out (with the reason)."""
    wanted = set(_csv(args.peers))
    cells, skipped = [], {}
    for case in cases:
        for peer in case.peers:
            if wanted and peer not in wanted:
                continue
            cell = Cell(case.workload, case.name, peer, case.n, args.quick)
            if cell.key in KNOWN_HANGS and not args.include_known_hangs:
                skipped[cell.key] = KNOWN_HANGS[cell.key]
                continue
            cells.append((case, cell))
    return cells, skipped


def calibrate(
    cells: list[tuple[Case, Cell]],
    timeout_s: float,
) -> tuple[list[tuple[Case, Cell]], dict[tuple[str, str, str], dict[str, Any]]]:
    """Size every calibrated cell; return the sized cells and the failed calibrations.

    Cases that differ only in N (the memory workload's two sizes) share one estimate.
    """
    groups: dict[tuple[Any, ...], list[tuple[Case, Cell]]] = {}
    for case, cell in cells:
        if _calibrated(case, cell):
            groups.setdefault(_estimate_key(case, cell), []).append((case, cell))
    estimates = {}
    for i, (key, members) in enumerate(groups.items(), 1):
        case, cell = members[0]
        n_max = max(c.n for c, _ in members)
        probe = Cell(cell.workload, cell.case, cell.peer, n_max, cell.quick)
        estimates[key] = run_cell(probe, "calibrate", timeout_s)
        _progress(f"calibrate {i}/{len(groups)}", probe, estimates[key], _calibration_note)
    sized, failed = [], {}
    for case, cell in cells:
        if not _calibrated(case, cell):
            sized.append((case, cell))
            continue
        est = estimates[_estimate_key(case, cell)]
        if est["status"] != "ok":
            failed[cell.key] = {**est, "phase": "calibration", "repeat": 0}
            continue
        n = max(
            min(_round(int(case.budget_s / est["item_s"])), case.n), min(MIN_CALIBRATED_N, case.n)
        )
        sized.append((case, Cell(cell.workload, cell.case, cell.peer, n, cell.quick)))
    return sized, failed


def _estimate_key(case: Case, cell: Cell) -> tuple[Any, ...]:
    return (case.workload, case.stages, case.slow_consumer, cell.peer)


def _calibrated(case: Case, cell: Cell) -> bool:
    return case.calibrate and (cell.peer != "typeflow" or case.calibrate_typeflow)


def _round(n: int) -> int:
    """Two significant digits, so sizes read well in the tables."""
    if n < 100:
        return n
    scale = int(10 ** (len(str(n)) - 2))
    return n // scale * scale


def _calibration_note(result: dict[str, Any]) -> str:
    if result["status"] != "ok":
        return str(result.get("error", ""))
    return f"{result['item_s'] * 1e6:.3g} µs/item at n={result['n']:,}"


# --- bytecode ------------------------------------------------------------------------

#: The packages the cells import (with what they pull in), compiled before timing.
COMPILED = (
    "typeflow",
    "returns",
    "typing_extensions",
    "cloudpickle",
    "tenacity",
    "pypeln",
    "stopit",
    "mpire",
    "tqdm",
    "joblib",
    "numpy",
)


def compile_bytecode() -> str:
    """Compile every package the cells import to bytecode, as pip does when it installs.

    uv does not compile at install, and a machine that sets
    ``PYTHONDONTWRITEBYTECODE`` never caches what it compiles: every fresh child
    would then compile each module from source on import, and the start-up
    cells would time the compiler instead of the library.  The children are also
    started without that variable (see ``cells._spawn``).
    """
    import compileall
    import importlib.util

    compiled = []
    for name in COMPILED:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        ok = True
        for location in spec.submodule_search_locations or []:
            ok &= bool(compileall.compile_dir(location, quiet=1, workers=os.cpu_count() or 1))
        if spec.origin and not spec.submodule_search_locations:
            ok &= bool(compileall.compile_file(spec.origin, quiet=1))
        compiled.append(name if ok else f"{name} (partly)")
    return "compiled before timing: " + ", ".join(compiled)


# --- the round-robin run -----------------------------------------------------------------


def run_all(
    cells: list[tuple[Case, Cell]], repeats: int, timeout_s: float
) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    runs: dict[tuple[str, str, str], list[dict[str, Any]]] = {c.key: [] for _, c in cells}
    total = repeats * sum(case.samples for case, _ in cells)
    done = 0
    for repeat in range(repeats):
        for case, cell in cells:
            for _ in range(case.samples):
                done += 1
                module = IMPORT_MODULES[cell.peer] if case.name == "import" else None
                result = run_cell(cell, "measure", timeout_s, import_module=module)
                result["repeat"] = repeat
                runs[cell.key].append(result)
                _progress(f"{done}/{total}", cell, result, lambda r, c=case: _headline(c, r))
    return runs


def _headline(case: Case, result: dict[str, Any]) -> str:
    if result["status"] != "ok":
        return str(result.get("error", ""))[:120]
    metrics = derive(case, result)
    col = VIEWS[case.workload].columns[0]
    return f"{col.fmt.format(metrics[col.key])} {col.label}"


def _progress(step: str, cell: Cell, result: dict[str, Any], note: Any) -> None:
    print(
        f"[{step}] {cell.workload:8} {cell.case[:30]:30} {cell.peer:14} n={cell.n:<9,} "
        f"{result['status']:12} {note(result)}",
        flush=True,
    )


# --- outputs -------------------------------------------------------------------------


def metadata(args: argparse.Namespace, argv: Sequence[str], repeats: int) -> dict[str, Any]:
    return {
        "command": " ".join(["uv run --group bench python benchmarks/run.py", *argv]),
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "quick": args.quick,
        "repeats": repeats,
        "timeout_s": args.timeout,
        "machine": _machine(),
        "versions": _versions(),
        "loadavg_before": _loadavg(),
    }


def _machine() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), ""
            )
    except OSError:
        pass
    return (
        f"{os.cpu_count()} vCPUs {model}, {platform.system()} {platform.release()}, "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"multiprocessing start method {multiprocessing.get_start_method()}"
    )


def _versions() -> str:
    found = []
    for name in VERSIONED:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _scrub(text: str) -> str:
    """Keep this machine's paths out of the results (tracebacks carry them)."""
    for path, name in (
        (str(HERE.parent), "<repo>"),
        (sys.base_prefix, "<python>"),
        (tempfile.gettempdir(), "<tmp>"),
        (str(Path.home()), "~"),
    ):
        text = text.replace(path, name)
    return re.sub(r"/[\w.-]+/\.cache/uv/[\w./-]+", "<uv-cache>", text)


Runs = dict[tuple[str, str, str], list[dict[str, Any]]]


def write_outputs(
    out: Path,
    cases: Sequence[Case],
    runs: Runs,
    skipped: dict[tuple[str, str, str], str],
    meta: dict[str, Any],
) -> str:
    """Write latest.json (every repeat, raw), then latest.md and latest.png."""
    out.mkdir(parents=True, exist_ok=True)
    raw = {
        "meta": meta,
        "skipped": [
            {"workload": w, "case": c, "peer": p, "reason": why}
            for (w, c, p), why in skipped.items()
        ],
        "runs": [
            {"workload": w, "case": c, "peer": p, **r}
            for (w, c, p), results in runs.items()
            for r in results
        ],
    }
    _write(out / "latest.json", _scrub(json.dumps(raw, indent=1, ensure_ascii=False)))
    return _render(out, cases, runs, skipped, meta)


def render(path: Path, out: Path) -> str:
    """Rebuild latest.md and latest.png from a saved latest.json (no measuring)."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    workloads = tuple(dict.fromkeys(r["workload"] for r in raw["runs"]))
    cases = build_cases(raw["meta"]["quick"], workloads)
    runs: Runs = {}
    for r in raw["runs"]:
        runs.setdefault((r["workload"], r["case"], r["peer"]), []).append(r)
    skipped = {(s["workload"], s["case"], s["peer"]): s["reason"] for s in raw["skipped"]}
    return _render(out, cases, runs, skipped, raw["meta"])


def _render(
    out: Path,
    cases: Sequence[Case],
    runs: Runs,
    skipped: dict[tuple[str, str, str], str],
    meta: dict[str, Any],
) -> str:
    out.mkdir(parents=True, exist_ok=True)
    reports = build(cases, runs, skipped)
    text = _scrub(markdown(reports, meta))
    _write(out / "latest.md", text)
    tmp = out / "latest.png.tmp"
    plot(reports, tmp)
    tmp.replace(out / "latest.png")
    return text


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.render:
        print(render(args.render, args.out))
        return 0
    repeats = args.repeats or (3 if args.quick else 5)
    cases = build_cases(args.quick, tuple(_csv(args.only)) or WORKLOADS)
    meta = metadata(args, argv, repeats)
    t0 = time.perf_counter()
    meta["bytecode"] = compile_bytecode()
    cells, skipped = plan(cases, args)
    cells, failed = calibrate(cells, args.timeout)
    runs = run_all(cells, repeats, args.timeout)
    runs.update({key: [result] for key, result in failed.items()})
    meta["duration_s"] = time.perf_counter() - t0
    meta["loadavg_after"] = _loadavg()
    text = write_outputs(args.out, cases, runs, skipped, meta)
    print(text)
    print(
        f"wrote {args.out / 'latest.md'}, latest.json, latest.png in {meta['duration_s']:.0f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
