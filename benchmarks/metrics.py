"""From raw child results to the numbers in the tables.

Each workload has a :class:`View`: the metrics shown per peer, and the one metric the
typeflow/peer ratio is taken on.  Ratios are always "how many times better typeflow
is": ``typeflow / peer`` for a higher-is-better metric (items/s, speed-up), and
``peer / typeflow`` for a lower-is-better one (µs per item, ms).  So > 1 means
typeflow leads, whatever the unit.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from suite import Case
from workloads import PAYLOAD_BYTES


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    fmt: str
    higher_better: bool


@dataclass(frozen=True)
class View:
    """How one workload is reported."""

    title: str
    explain: str
    columns: tuple[Column, ...]
    ratio_key: str | None  # None: no ratio (absolute targets only)

    def column(self, key: str) -> Column:
        return next(c for c in self.columns if c.key == key)


US = Column("us_per_item", "µs/item", "{:.3g}", higher_better=False)
SPEEDUP = Column("speedup_p", "x serial (p)", "{:.3g}", higher_better=True)
RATE = Column("items_per_s", "items/s", "{:,.0f}", higher_better=True)
IDEAL = Column("pct_ideal", "% of ideal", "{:.0f}", higher_better=True)
MBPS = Column("mb_per_s", "MB/s", "{:,.0f}", higher_better=True)
RSS = Column("rss_mb", "peak RSS growth (MB)", "{:.1f}", higher_better=False)
PSS = Column("pss_mb", "peak PSS growth (MB)", "{:.1f}", higher_better=False)
PER_ITEM = Column("bytes_per_item", "B/item", "{:,.0f}", higher_better=False)
MS = Column("ms", "ms", "{:.1f}", higher_better=False)

VIEWS: dict[str, View] = {
    "overhead": View(
        "1. Per-item overhead: x+1, 2 workers per stage",
        "End-to-end wall time per item, start-up and teardown included. "
        "\"x serial (p)\" is the serial loop's time over the peer's, both timed in the "
        "same child; the ratio is taken on it, so load drift between cells cancels.",
        (US, SPEEDUP),
        "speedup_p",
    ),
    "cpu": View(
        "2. CPU-bound: ~1 ms of pure Python per item, 2 processes",
        "Speed-up over the paired serial loop (the limit is 2.0 on 2 cores).",
        (RATE, SPEEDUP),
        "speedup_p",
    ),
    "io": View(
        "3. I/O-bound: 10 ms waits",
        "Ideal = workers / 10 ms items/s. time.sleep on threads, asyncio.sleep on tasks.",
        (RATE, IDEAL),
        "items_per_s",
    ),
    "mixed": View(
        "4. Mixed: sleep 5 ms (thread x16) -> ~1 ms CPU (process x2) -> x+1",
        "Ideal = min(16 / 5 ms, 2 / B's cost), B timed in the same child. The ratio is "
        "taken on the speed-up over the paired serial chain.",
        (RATE, SPEEDUP, IDEAL),
        "speedup_p",
    ),
    "payload": View(
        "5. Payload: 1 MiB float64 arrays into a process stage (2 workers)",
        "MB/s = 10^6 bytes of input per second. Memory: peak growth of the parent plus "
        "all children; RSS counts pages a forked child shares with its parent once per "
        "process, PSS splits them, so PSS is the memory actually used.",
        (MBPS, RSS, PSS),
        "mb_per_s",
    ),
    "memory": View(
        "6. Memory: 2 thread stages (x+1, 2x), bound 64, slow consumer",
        "Peak RSS growth of the whole process tree. The consumer sleeps 0.5 ms every "
        "100 items. Peers too slow for the full size within the time budget ran fewer "
        "items: compare them by bytes per item.",
        (RSS, PER_ITEM, RATE),
        None,
    ),
    "startup": View(
        "7. Start-up + shut-down: one item end to end, per backend; import time",
        "Pipeline built, one item through, everything shut down (the peer is imported "
        'before the clock starts). "import" is the import alone in a fresh interpreter. '
        "Each repeat runs three fresh children per cell (a cell lasts a few milliseconds, "
        "as long as one hiccup of a shared machine); the median is over all of them.",
        (MS,),
        "ms",
    ),
}


def _mean_pair(raw: dict[str, Any], key: str) -> float:
    return (float(raw[f"{key}_before"]) + float(raw[f"{key}_after"])) / 2


def derive(case: Case, raw: dict[str, Any]) -> dict[str, float]:
    """The metrics of one successful repeat."""
    wall, n = raw["wall_s"], raw["n"]
    if case.workload == "startup":
        return {"ms": wall * 1e3}
    out: dict[str, float] = {"items_per_s": n / wall, "us_per_item": wall / n * 1e6}
    if "serial_item_s_before" in raw:
        serial = _mean_pair(raw, "serial_item_s")
        out["speedup_p"] = serial / (wall / n)
        out["serial_item_us"] = serial * 1e6
    if case.workload == "io":
        out["pct_ideal"] = (
            100 * out["items_per_s"] * case.params["latency_s"] / case.params["workers"]
        )
    if case.workload == "mixed":
        ideal = min(
            case.params["a_workers"] / case.params["a_latency_s"],
            case.params["b_workers"] / _mean_pair(raw, "b_item_s"),
        )
        out["pct_ideal"] = 100 * out["items_per_s"] / ideal
    if "rss_peak_growth" in raw:
        out["rss_mb"] = raw["rss_peak_growth"] / 1e6
        out["bytes_per_item"] = raw["rss_peak_growth"] / n
    if "pss_peak_growth" in raw:
        out["pss_mb"] = raw["pss_peak_growth"] / 1e6
    if case.workload == "payload":
        out["mb_per_s"] = n * PAYLOAD_BYTES / wall / 1e6
    return out


@dataclass(frozen=True)
class Summary:
    """All repeats of one cell, reduced."""

    peer: str
    n: int
    statuses: dict[str, int]
    medians: dict[str, float]
    spreads: dict[str, float]  # half of (max - min) over the median, in %
    values: dict[str, list[float]]

    @property
    def ok(self) -> bool:
        return bool(self.medians)


def summarize(case: Case, peer: str, runs: list[dict[str, Any]]) -> Summary:
    statuses: dict[str, int] = {}
    for r in runs:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    derived = [derive(case, r) for r in runs if r["status"] == "ok"]
    values: dict[str, list[float]] = {}
    for d in derived:
        for k, v in d.items():
            values.setdefault(k, []).append(v)
    medians = {k: statistics.median(v) for k, v in values.items()}
    spreads = {
        k: 50 * (max(v) - min(v)) / abs(medians[k]) if medians[k] else 0.0
        for k, v in values.items()
    }
    n = max((r.get("n", 0) for r in runs), default=0)
    return Summary(peer, n, statuses, medians, spreads, values)


def ratio(view: View, typeflow: Summary | None, peer: Summary) -> float | None:
    """How many times better typeflow is than ``peer`` on the view's ratio metric."""
    key = view.ratio_key
    if key is None or typeflow is None or key not in typeflow.medians or key not in peer.medians:
        return None
    tf, other = typeflow.medians[key], peer.medians[key]
    if view.column(key).higher_better:
        return tf / other if other else None
    return other / tf if tf else None
