"""Turn the raw repeats into ``latest.md`` (tables) and ``latest.png`` (one plot)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metrics import VIEWS, Summary, View, ratio, summarize
from peers import DESCRIPTIONS, RUNNERS
from suite import Case
from targets import Target, targets_for

Runs = dict[tuple[str, str, str], list[dict[str, Any]]]
REFERENCE_PEERS = frozenset({"typeflow", "serial"})


@dataclass(frozen=True)
class CaseReport:
    case: Case
    view: View
    rows: list[Summary]
    skipped: dict[str, str]

    @property
    def typeflow(self) -> Summary | None:
        return next((r for r in self.rows if r.peer == "typeflow" and r.ok), None)

    def best_peer(self) -> str | None:
        """The peer with the best median on the ratio metric (typeflow and serial excluded)."""
        key = self.view.ratio_key
        rows = [r for r in self.rows if r.peer not in REFERENCE_PEERS and key in r.medians]
        if key is None or not rows:
            return None
        sign = 1 if self.view.column(key).higher_better else -1
        return max(rows, key=lambda r: sign * r.medians[key]).peer


def build(
    cases: Sequence[Case], runs: Runs, skipped: dict[tuple[str, str, str], str]
) -> list[CaseReport]:
    reports = []
    for case in cases:
        rows = [
            summarize(case, peer, runs[(case.workload, case.name, peer)])
            for peer in case.peers
            if (case.workload, case.name, peer) in runs
        ]
        skip = {k[2]: why for k, why in skipped.items() if k[:2] == (case.workload, case.name)}
        reports.append(CaseReport(case, VIEWS[case.workload], rows, skip))
    return reports


# --- targets -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    target: Target
    peer: str | None  # the peer the ratio was taken against (resolves "best")
    measured: float | None

    @property
    def met(self) -> bool | None:
        return None if self.measured is None else self.target.met(self.measured)


def verdicts(report: CaseReport) -> list[Verdict]:
    out = []
    tf = report.typeflow
    for t in targets_for(report.case.workload, report.case.name):
        if t.metric is not None:
            out.append(Verdict(t, "typeflow", tf.medians.get(t.metric) if tf else None))
            continue
        peer = report.best_peer() if t.peer == "best" else t.peer
        row = next((r for r in report.rows if r.peer == peer), None)
        out.append(Verdict(t, peer, ratio(report.view, tf, row) if row else None))
    return out


def _met(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "**no**")


# --- markdown --------------------------------------------------------------------------


def markdown(reports: Sequence[CaseReport], meta: dict[str, Any]) -> str:
    lines = [
        "# typeflow benchmark: latest run",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['started']} UTC, {meta['duration_s']:.0f} s, {meta['repeats']} repeats "
        "per cell, each in a fresh child process, round-robin.  ",
        f"Machine: {meta['machine']}  ",
        f"Load average before/after: {meta['loadavg_before']} / {meta['loadavg_after']}  ",
        f"Versions: {meta['versions']}  ",
        f"Bytecode: {meta.get('bytecode', 'as installed')}",
        "",
        "Cells show the median over repeats. **typeflow/peer** is how many times better "
        "typeflow is than that peer on the case's ratio metric (> 1: typeflow leads). "
        "Spread is half of (max - min) over the median. A repeat that did not return N "
        "results is `bad_count`; one killed after the time limit is `HANG`.",
        "",
    ]
    lines += _targets_section(reports)
    workload = ""
    for rep in reports:
        if rep.case.workload != workload:
            workload = rep.case.workload
            lines += [f"## {rep.view.title}", "", rep.view.explain, ""]
        lines += _case_table(rep)
        if workload == "memory" and rep.case.name == "larger":
            lines += _flatness(reports)
    lines += ["## Peers", ""] + [f"- `{k}`: {v}" for k, v in DESCRIPTIONS.items()] + [""]
    return "\n".join(lines)


def _targets_section(reports: Sequence[CaseReport]) -> list[str]:
    lines = [
        "## Targets (issue 5)",
        "",
        "| workload | case | target | against | measured | met |",
        "|---|---|---|---|---|---|",
    ]
    for rep in reports:
        for v in verdicts(rep):
            measured = "-" if v.measured is None else f"{v.measured:.3g}"
            if v.target.metric is None and v.measured is not None:
                measured += "x"
            lines.append(
                f"| {rep.case.workload} | {rep.case.name} | {v.target.text} | "
                f"{v.peer or '-'} | {measured} | {_met(v.met)} |"
            )
    return [*lines, ""]


def _case_table(rep: CaseReport) -> list[str]:
    cols = rep.view.columns
    head = [
        "peer",
        "n",
        *[c.label for c in cols],
        "spread",
        "runs",
        "typeflow/peer",
        "target",
        "met",
    ]
    lines = [f"### {rep.case.name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    vs = verdicts(rep)
    for row in rep.rows:
        lines.append("| " + " | ".join(_row_cells(rep, row, vs)) + " |")
    for peer, why in rep.skipped.items():
        lines.append(f"| {peer} | - | skipped: {why} |" + " |" * (len(head) - 3))
    serial = _serial_line(rep)
    return [*lines, "", *serial]


def _row_cells(rep: CaseReport, row: Summary, vs: list[Verdict]) -> list[str]:
    key = rep.view.ratio_key or rep.view.columns[0].key
    values = [
        c.fmt.format(row.medians[c.key]) if c.key in row.medians else "-" for c in rep.view.columns
    ]
    if not row.ok:
        values[0] = ", ".join(f"{s} x{k}" for s, k in row.statuses.items())
    spread = f"±{row.spreads[key]:.0f} %" if key in row.spreads else "-"
    total = sum(row.statuses.values())
    runs = f"{row.statuses.get('ok', 0)}/{total}"
    bad = {s: k for s, k in row.statuses.items() if s != "ok"}
    if bad and row.ok:
        runs += " (" + ", ".join(f"{k} {s}" for s, k in bad.items()) + ")"
    r = ratio(rep.view, rep.typeflow, row) if row.peer not in REFERENCE_PEERS else None
    mine = [v for v in vs if v.peer == row.peer]
    target = "; ".join(v.target.text for v in mine) or ""
    met = "; ".join(_met(v.met) for v in mine) or ""
    return [
        row.peer,
        f"{row.n:,}",
        *values,
        spread,
        runs,
        "" if r is None else f"{r:.2f}x",
        target,
        met,
    ]


def _serial_line(rep: CaseReport) -> list[str]:
    serial = [v for r in rep.rows for v in r.values.get("serial_item_us", [])]
    if not serial:
        return []
    serial.sort()
    return [
        f"Paired serial loop over the same stages: median {serial[len(serial) // 2]:.3g} "
        f"µs/item (range {serial[0]:.3g}-{serial[-1]:.3g} over all cells).",
        "",
    ]


def _flatness(reports: Sequence[CaseReport]) -> list[str]:
    mem = [r for r in reports if r.case.workload == "memory"]
    if len(mem) != 2:
        return []
    small, large = mem[0].typeflow, mem[1].typeflow
    if small is None or large is None:
        return []
    a, b = small.medians.get("rss_mb", 0.0), large.medians.get("rss_mb", 0.0)
    flat = b <= max(2 * a, a + 5)
    return [
        f"typeflow: +{a:.1f} MB at {small.n:,} items, +{b:.1f} MB at {large.n:,} items: "
        f"{'flat' if flat else '**grows with n**'} (flat: at most 2x or +5 MB).",
        "",
    ]


# --- plot ------------------------------------------------------------------------------

PLOTTED: dict[str, tuple[str, bool]] = {  # workload -> (metric, log scale)
    "overhead": ("us_per_item", True),
    "cpu": ("speedup_p", False),
    "io": ("pct_ideal", False),
    "mixed": ("items_per_s", False),
    "payload": ("mb_per_s", True),
    "memory": ("bytes_per_item", True),
    "startup": ("ms", True),
}


def plot(reports: Sequence[CaseReport], path: Path) -> None:
    """One panel per workload (overhead, if present, spans the top row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(RUNNERS)}
    workloads = list(dict.fromkeys(rep.case.workload for rep in reports))
    wide = [w for w in workloads if w == "overhead"]
    rest = [w for w in workloads if w != "overhead"]
    ncols = max(1, min(3, len(rest)))
    nrows = len(wide) + -(-len(rest) // ncols)
    fig = plt.figure(
        figsize=(6.5 * ncols if not wide else 20, 4.6 * nrows), constrained_layout=True
    )
    grid = fig.add_gridspec(nrows, ncols)
    slots = [grid[0, :]] if wide else []
    slots += [grid[len(wide) + k // ncols, k % ncols] for k in range(len(rest))]
    for slot, workload in zip(slots, wide + rest, strict=True):
        _panel(fig.add_subplot(slot), [r for r in reports if r.case.workload == workload], colors)
    shown = [p for p in RUNNERS if any(r.peer == p for rep in reports for r in rep.rows)]
    handles = [Rectangle((0, 0), 1, 1, color=colors[p]) for p in shown]
    fig.legend(handles, shown, loc="outside lower center", ncol=len(shown))
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)


def _panel(ax: Any, reports: list[CaseReport], colors: dict[str, Any]) -> None:
    workload = reports[0].case.workload
    metric, log = PLOTTED[workload]
    peers = list(dict.fromkeys(r.peer for rep in reports for r in rep.rows))
    width = 0.8 / max(len(peers), 1)
    for i, rep in enumerate(reports):
        for j, peer in enumerate(peers):
            row = next((r for r in rep.rows if r.peer == peer), None)
            if row is None or metric not in row.medians:
                continue
            ax.bar(
                i + (j - len(peers) / 2 + 0.5) * width,
                row.medians[metric],
                width,
                color=colors[peer],
                edgecolor="black" if peer == "typeflow" else "none",
                linewidth=1.5,
            )
    ax.set_xticks(range(len(reports)), [r.case.name for r in reports], fontsize=8)
    view = reports[0].view
    column = next(c for c in view.columns if c.key == metric)
    better = "higher" if column.higher_better else "lower"
    ax.set_ylabel(f"{column.label} ({better} is better)")
    ax.set_title(view.title.split(":")[0], fontsize=11)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
