"""The benchmark suite: which workloads, cases, peers and sizes make up a run.

A *case* is one pipeline shape of one workload (say "3 stages, process").  Each
(case, peer) pair is a *cell*; every repeat of a cell runs in its own fresh child
process.  :func:`build_cases` returns the same cases in the parent and in every
child, so a child only needs the workload name, the case name and the quick flag.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from workloads import (
    IO_SLEEP_S,
    PAYLOAD_BYTES,
    PAYLOAD_ELEMENTS,
    Backend,
    StageSpec,
    array_sum,
    arrays,
    blob_ones,
    blobs,
    cpu_burn,
    dbl,
    inc,
    ints,
    io_sleep,
    io_sleep_short,
    spec,
)

Paired = Literal["none", "chain", "mixed"]

WORKLOADS: tuple[str, ...] = (
    "overhead",
    "cpu",
    "io",
    "mixed",
    "payload",
    "memory",
    "startup",
)

POOL_PEERS = ("typeflow", "pypeln", "mp_pool", "mp_pool_c1", "cf", "joblib", "mpire")
TASK_PEERS = ("typeflow", "pypeln", "asyncio_queue", "asyncio_gather")
#: The peers that can stop a call past its timeout (the others only stop waiting).
TIMEOUT_PEERS = ("typeflow", "pypeln", "mpire")
#: On tasks: pypeln, and bare asyncio worker tasks with ``asyncio.timeout`` per call.
TASK_TIMEOUT_PEERS = ("typeflow", "pypeln", "asyncio_queue")
#: The timeout of the overhead cases under one: far above any call's time.
TIMEOUT_S = 5.0
PROCESS_PEERS = ("typeflow", "mp_pool", "cf", "mpire", "joblib", "pypeln")
THREAD_IO_PEERS = ("typeflow", "mp_pool", "cf", "joblib", "mpire", "pypeln")
MIXED_PEERS = (
    "typeflow",
    "mp_pool",
    "cf",
    "joblib",
    "mpire",
    "pypeln",
    "asyncio_queue",
    "asyncio_gather",
)
MEMORY_PEERS = (
    "typeflow",
    "serial",
    "pypeln",
    "mpire",
    "joblib",
    "mp_pool",
    "cf",
    "asyncio_queue",
    "asyncio_gather",
)
#: Fresh children per repeat for the start-up cells (a few milliseconds each).
STARTUP_SAMPLES = 3
STARTUP_POOL_PEERS = ("typeflow", "mp_pool", "cf", "joblib", "mpire", "pypeln")
IMPORT_PEERS = ("typeflow", "pypeln", "mpire", "joblib", "mp_pool", "cf", "asyncio_queue")

#: Cells not run by default, with the reason (``--include-known-hangs`` runs them).
KNOWN_HANGS: dict[tuple[str, str, str], str] = {
    (
        "overhead",
        "3 stages, process",
        "joblib",
    ): "two chained loky generators deadlock: loky's result thread blocks pulling the upstream "
    "generator",
}


@dataclass(frozen=True)
class Case:
    """One pipeline shape of one workload, run by every peer in ``peers``.

    Attributes:
        workload: The workload it belongs to (a key of :data:`WORKLOADS`).
        name: Unique within the workload; shown as the table's heading.
        stages: The pipeline.
        peers: Who runs it (``typeflow`` first).
        n: Items per run.
        source: ``"ints"``, ``"arrays"`` (1 MiB float64 arrays) or ``"blobs"`` (1 MiB
            ``bytes``).
        calibrate: Cut ``n`` per peer so that a run takes about ``budget_s``.
        calibrate_typeflow: Whether typeflow's ``n`` is cut too (not in the memory
            workload, whose point is typeflow's memory at exactly ``n`` items).
        budget_s: Wall time a calibrated run aims at.
        slow_consumer: The consumer sleeps 0.5 ms every 100 items.
        sample_memory: Sample RSS (and PSS, if ``pss``) of the process tree during the run.
        paired: Serial baseline timed in the same child before and after the run:
            ``"chain"`` (the same stages, serially), ``"mixed"`` (also times stage B alone).
        n_pair: Items of each paired serial timing.
        expected: Checksum of the outputs for ``n`` items, when cheap to know.
        params: Workload-specific numbers the metrics need (workers, latency).
        samples: Fresh children per repeat (each recorded as one run; the median is
            taken over all of them): more for cells of a few milliseconds, where one
            scheduling hiccup of the shared machine is as long as the cell.
    """

    workload: str
    name: str
    stages: tuple[StageSpec, ...]
    peers: tuple[str, ...]
    n: int
    source: Literal["ints", "arrays", "blobs"] = "ints"
    calibrate: bool = False
    calibrate_typeflow: bool = True
    budget_s: float = 1.0
    slow_consumer: bool = False
    sample_memory: bool = False
    pss: bool = False
    paired: Paired = "none"
    n_pair: int = 0
    expected: Callable[[int], float] | None = None
    params: dict[str, float] = field(default_factory=dict)
    samples: int = 1

    def items(self, n: int) -> Iterator[Any]:
        if self.source == "arrays":
            return arrays(n)
        return blobs(n) if self.source == "blobs" else ints(n)


def _sum_inc(n: int) -> float:
    return n * (n - 1) / 2 + n


def _sum_inc_dbl(n: int) -> float:
    return 2 * _sum_inc(n)


def _sum_inc_dbl_inc(n: int) -> float:
    return 2 * _sum_inc(n) + n


def _sum_arrays(n: int) -> float:
    return float(PAYLOAD_ELEMENTS) * n * (n - 1) / 2


def _sum_blob_ones(n: int) -> float:
    return float(PAYLOAD_BYTES) * sum(1 for i in range(n) if i % 256 == 1)


def overhead_cases(quick: bool) -> list[Case]:
    """Workload 1: ``x+1`` (and ``x+1 -> 2x -> x+1``), 2 workers per stage."""
    cases = []
    backends: tuple[Backend, ...] = ("thread", "process", "task")
    for backend in backends:
        peers: tuple[str, ...] = TASK_PEERS if backend == "task" else POOL_PEERS
        for fns, expected in (((inc,), _sum_inc), ((inc, dbl, inc), _sum_inc_dbl_inc)):
            label = "1 stage" if len(fns) == 1 else f"{len(fns)} stages"
            stages = tuple(spec(f, backend, 2, chunk=1024) for f in fns)
            cases.append(_overhead_case(f"{label}, {backend}", stages, peers, expected, quick))
    # Under a timeout (never reached), against the peers that can stop a call past
    # one: what a per-call deadline costs a quick item.
    for backend in backends:
        stages = (spec(inc, backend, 2, chunk=1024, timeout=TIMEOUT_S),)
        name = f"1 stage, {backend}, timeout"
        peers = TASK_TIMEOUT_PEERS if backend == "task" else TIMEOUT_PEERS
        cases.append(_overhead_case(name, stages, peers, _sum_inc, quick))
    return cases


def _overhead_case(
    name: str,
    stages: tuple[StageSpec, ...],
    peers: tuple[str, ...],
    expected: Callable[[int], float],
    quick: bool,
) -> Case:
    return Case(
        workload="overhead",
        name=name,
        stages=stages,
        peers=peers,
        n=200_000 if quick else 1_000_000,
        calibrate=True,
        budget_s=0.25 if quick else 1.0,
        paired="chain",
        n_pair=100_000 if quick else 300_000,
        expected=expected,
    )


def cpu_cases(quick: bool) -> list[Case]:
    """Workload 2: about 1 ms of pure Python per item, 2 processes."""
    n = 600 if quick else 1500
    return [
        Case(
            workload="cpu",
            name="2 processes",
            stages=(spec(cpu_burn, "process", 2, chunk=4),),
            peers=PROCESS_PEERS,
            n=n,
            paired="chain",
            n_pair=n // 5,
        )
    ]


def io_cases(quick: bool) -> list[Case]:
    """Workload 3: 10 ms sleeps on many threads (time.sleep) or tasks (asyncio.sleep)."""
    n = 1000 if quick else 2000
    cases = []
    kinds: tuple[tuple[Backend, tuple[str, ...]], ...] = (
        ("thread", THREAD_IO_PEERS),
        ("task", TASK_PEERS),
    )
    for backend, peers in kinds:
        for workers in (50, 200):
            cases.append(
                Case(
                    workload="io",
                    name=f"{workers} {backend}s",
                    stages=(spec(io_sleep, backend, workers, chunk=1),),
                    peers=peers,
                    n=n,
                    expected=lambda k: k * (k - 1) / 2,
                    params={"workers": workers, "latency_s": IO_SLEEP_S},
                )
            )
    return cases


def mixed_cases(quick: bool) -> list[Case]:
    """Workload 4: sleep 5 ms (16 threads) -> ~1 ms CPU (2 processes) -> x+1."""
    stages = (
        spec(io_sleep_short, "thread", 16, chunk=1),
        spec(cpu_burn, "process", 2, chunk=4),
        spec(inc, "sync", 1),
    )
    return [
        Case(
            workload="mixed",
            name="thread x16 -> process x2 -> x+1",
            stages=stages,
            peers=MIXED_PEERS,
            n=500 if quick else 1000,
            paired="mixed",
            n_pair=20 if quick else 40,
            params={"a_workers": 16, "a_latency_s": 0.005, "b_workers": 2},
        )
    ]


#: The payload cases: label, stage function, source, the expected sum of the results.
_PAYLOADS: tuple[
    tuple[str, Callable[[Any], Any], Literal["arrays", "blobs"], Callable[[int], float]], ...
] = (
    ("arrays", array_sum, "arrays", _sum_arrays),
    ("bytes", blob_ones, "blobs", _sum_blob_ones),
)


def payload_cases(quick: bool) -> list[Case]:
    """Workload 5: fresh 1 MiB float64 arrays, and 1 MiB ``bytes``, into a process
    stage that reads each whole and returns a number."""
    return [
        Case(
            workload="payload",
            name=f"1 MiB {label}, 2 processes",
            stages=(spec(fn, "process", 2, chunk=1),),
            peers=(*PROCESS_PEERS, "serial"),
            n=200 if quick else 500,
            source=source,
            sample_memory=True,
            pss=True,
            expected=expected,
        )
        for label, fn, source, expected in _PAYLOADS
    ]


def memory_cases(quick: bool) -> list[Case]:
    """Workload 6: two trivial thread stages, bound 64, slow consumer, two sizes."""
    stages = (
        spec(inc, "thread", 2, chunk=64, buffer=64),
        spec(dbl, "thread", 2, chunk=64, buffer=64),
    )
    sizes = (10_000, 100_000) if quick else (100_000, 1_000_000)
    return [
        Case(
            workload="memory",
            name=name,
            stages=stages,
            peers=MEMORY_PEERS,
            n=n,
            calibrate=True,
            calibrate_typeflow=False,
            budget_s=1.0 if quick else 4.0,
            slow_consumer=True,
            sample_memory=True,
            expected=_sum_inc_dbl,
        )
        for name, n in zip(("smaller", "larger"), sizes, strict=True)
    ]


def startup_cases(quick: bool) -> list[Case]:
    """Workload 7: one item end to end per backend, and the import in a fresh interpreter."""
    cases = []
    for backend in ("thread", "process", "task"):
        fn_spec = spec(inc, backend, 2, chunk=1)
        peers = TASK_PEERS if backend == "task" else STARTUP_POOL_PEERS
        cases.append(
            Case(
                workload="startup",
                name=backend,
                stages=(fn_spec,),
                peers=peers,
                n=1,
                expected=_sum_inc,
                samples=STARTUP_SAMPLES,
            )
        )
    cases.append(
        Case(
            workload="startup",
            name="import",
            stages=(),
            peers=IMPORT_PEERS,
            n=0,
            samples=STARTUP_SAMPLES,
        )
    )
    return cases


BUILDERS: dict[str, Callable[[bool], list[Case]]] = {
    "overhead": overhead_cases,
    "cpu": cpu_cases,
    "io": io_cases,
    "mixed": mixed_cases,
    "payload": payload_cases,
    "memory": memory_cases,
    "startup": startup_cases,
}


def build_cases(quick: bool, only: tuple[str, ...] = WORKLOADS) -> list[Case]:
    """Every case of the selected workloads, in the order they are reported."""
    return [case for w in WORKLOADS if w in only for case in BUILDERS[w](quick)]


def find_case(workload: str, name: str, quick: bool) -> Case:
    for case in BUILDERS[workload](quick):
        if case.name == name:
            return case
    raise KeyError(f"no case {name!r} in workload {workload!r}")
