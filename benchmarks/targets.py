"""The targets of issue 5, as data.

A :class:`Target` is either a ratio against a peer (``peer`` names it, or ``"best"``
for the best peer of that case on the ratio metric), checked on the typeflow/peer
ratio of ``metrics.ratio``; or an absolute bound on one of typeflow's own medians
(``peer == "typeflow"``, ``metric`` names it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Target:
    workload: str
    case: str
    peer: str
    op: Literal[">=", "<="]
    value: float
    metric: str | None = None  # absolute targets only

    @property
    def text(self) -> str:
        if self.metric is None:
            who = "the best peer" if self.peer == "best" else self.peer
            return f"≥ {self.value:g}x {who}"
        unit = {
            "us_per_item": " µs/item",
            "speedup_p": "x serial",
            "pct_ideal": " % of ideal",
            "mb_per_s": " MB/s",
            "rss_mb": " MB",
            "pss_mb": " MB (PSS)",
            "ms": " ms",
        }[self.metric]
        return f"{self.op} {self.value:g}{unit}"

    def met(self, measured: float) -> bool:
        return measured >= self.value if self.op == ">=" else measured <= self.value


def _vs(workload: str, case: str, peer: str, value: float) -> Target:
    return Target(workload, case, peer, ">=", value)


def _abs(workload: str, case: str, metric: str, op: Literal[">=", "<="], value: float) -> Target:
    return Target(workload, case, "typeflow", op, value, metric)


TARGETS: tuple[Target, ...] = (
    _vs("overhead", "1 stage, thread", "pypeln", 30),
    _vs("overhead", "1 stage, thread", "mp_pool_c1", 4),
    _abs("overhead", "1 stage, thread", "us_per_item", "<=", 2),
    _vs("overhead", "1 stage, process", "pypeln", 300),
    _vs("overhead", "1 stage, process", "mpire", 4),
    _vs("overhead", "1 stage, process", "mp_pool", 0.25),
    _vs("overhead", "1 stage, task", "pypeln", 15),
    _vs("overhead", "1 stage, task", "asyncio_queue", 1),
    _vs("overhead", "3 stages, thread", "pypeln", 20),
    _vs("overhead", "3 stages, process", "pypeln", 200),
    _vs("overhead", "3 stages, task", "pypeln", 10),
    _vs("cpu", "2 processes", "best", 1.05),
    _abs("cpu", "2 processes", "speedup_p", ">=", 1.75),
    _vs("io", "200 threads", "best", 1.3),
    _abs("io", "200 threads", "pct_ideal", ">=", 60),
    _vs("io", "200 tasks", "asyncio_queue", 0.95),
    _abs("io", "50 threads", "pct_ideal", ">=", 90),
    _abs("io", "50 tasks", "pct_ideal", ">=", 90),
    _vs("mixed", "thread x16 -> process x2 -> x+1", "best", 1.1),
    _vs("payload", "1 MiB arrays, 2 processes", "best", 3),
    _abs("payload", "1 MiB arrays, 2 processes", "mb_per_s", ">=", 1000),
    _abs("payload", "1 MiB arrays, 2 processes", "pss_mb", "<=", 50),
    _vs("payload", "1 MiB bytes, 2 processes", "best", 3),
    _abs("payload", "1 MiB bytes, 2 processes", "mb_per_s", ">=", 1000),
    _abs("payload", "1 MiB bytes, 2 processes", "pss_mb", "<=", 50),
    _abs("memory", "smaller", "rss_mb", "<=", 20),
    _abs("memory", "larger", "rss_mb", "<=", 20),
    _vs("startup", "process", "mp_pool", 1),
    _abs("startup", "process", "ms", "<=", 20),
    _abs("startup", "import", "ms", "<=", 50),
)


def targets_for(workload: str, case: str) -> list[Target]:
    return [t for t in TARGETS if t.workload == workload and t.case == case]
