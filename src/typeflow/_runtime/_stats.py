"""Per-stage counters while a run goes, and the frozen snapshot users read.

Each worker owns its counters (one writer, so no lock); a snapshot adds them up.
"""

from __future__ import annotations

from dataclasses import dataclass

from typeflow._options import Backend

__all__ = ["Counters", "RunStatistics", "StageStatistics"]


class Counters:
    """What one worker has done so far.  Written only by that worker."""

    __slots__ = ("crashed", "failed", "filtered", "restarts", "retried", "succeeded", "timed_out")

    def __init__(self) -> None:
        self.filtered = 0
        self.succeeded = 0
        self.failed = 0
        self.retried = 0
        self.timed_out = 0
        self.crashed = 0
        self.restarts = 0


@dataclass(frozen=True, slots=True)
class StageStatistics:
    """What one stage has done so far.

    Attributes:
        name: the stage's name.
        backend: where its workers run.
        workers: its ``workers`` option (a short input in memory may start fewer).
        items_in: items its workers have taken from its buffer.
        succeeded: items it passed on (a one-to-many stage counts each output).
        failed: items that failed in it (a ``Failure`` naming this stage).
        filtered: items it dropped on purpose (a filter said no, or a one-to-many
            call made no output).
        retried: extra tries it made (a call that succeeded on its third try
            counts 2).
        timed_out: items that failed because a call exceeded ``timeout``.
        crashed: items that failed because their worker died.
        restarts: workers replaced after a crash or a timeout.
        queued: items waiting in its buffer at the time of the snapshot.
    """

    name: str
    backend: Backend
    workers: int
    items_in: int
    succeeded: int
    failed: int
    filtered: int
    retried: int
    timed_out: int
    crashed: int
    restarts: int
    queued: int


@dataclass(frozen=True, slots=True)
class RunStatistics:
    """A snapshot of a run: what came in, what came out, and each stage's counters.

    Every item read is either done (all its results ready for the caller, or
    filtered out) or still in flight: ``items_read == done + in_flight`` at any
    time, and ``in_flight == 0`` once the run has ended normally.  ``succeeded``
    and ``failed`` count the results the caller has been given (not those
    dropped by ``close()``); once the run has ended, without one-to-many stages
    and filters, ``done == succeeded + failed``.

    Attributes:
        items_read: items taken from the input.
        succeeded: ``Success`` results yielded so far.
        failed: ``Failure`` results yielded so far.
        done: input items whose every outcome is known.
        in_flight: items read but not done yet.
        elapsed: seconds since the run started.
        stages: one :class:`StageStatistics` per stage, first to last.
    """

    items_read: int
    succeeded: int
    failed: int
    done: int
    in_flight: int
    elapsed: float
    stages: tuple[StageStatistics, ...]

    def __str__(self) -> str:
        header = (
            "stage",
            "backend",
            "in",
            "ok",
            "failed",
            "filtered",
            "retried",
            "timeout",
            "crash",
            "restarts",
        )
        rows = [header] + [
            (
                s.name,
                f"{s.workers} {s.backend}",
                *map(
                    str,
                    (
                        s.items_in,
                        s.succeeded,
                        s.failed,
                        s.filtered,
                        s.retried,
                        s.timed_out,
                        s.crashed,
                        s.restarts,
                    ),
                ),
            )
            for s in self.stages
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            "  ".join(
                cell.ljust(w) if i < 2 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
            for row in rows
        ]
        lines.append(
            f"{self.items_read} read, {self.succeeded} succeeded, {self.failed} failed, "
            f"{self.done} done, {self.in_flight} in flight, {self.elapsed:.3f} s"
        )
        return "\n".join(lines)
