"""The work that every peer runs: stage functions, item sources and pipeline shapes.

Everything here is importable by name from worker processes (fork, loky's spawn,
cloudpickle by reference), so the functions live at module level and the module
imports nothing heavy at import time (NumPy is imported only by the payload items).

A pipeline is described once, as a tuple of :class:`StageSpec`, and every peer in
``peers.py`` turns that description into its own API.  A stage's ``backend`` is
``"thread"``, ``"process"``, ``"task"`` (asyncio) or ``"sync"`` (applied in the
caller, the trivial last stage of the mixed pipeline).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Literal

Backend = Literal["thread", "process", "task", "sync"]

#: Iterations of :func:`cpu_burn`: about 1 ms of pure Python on the reference machine.
CPU_LOOPS = 15_000
#: Float64 elements in one payload array: 1 MiB.
PAYLOAD_ELEMENTS = 131_072
PAYLOAD_BYTES = PAYLOAD_ELEMENTS * 8
#: Latency of one I/O item in the io workload, and of stage A in the mixed one.
IO_SLEEP_S = 0.010
MIXED_SLEEP_S = 0.005


# --- stage functions (sync) -------------------------------------------------------


def inc(x: int) -> int:
    """The trivial stage: per-item overhead is all that is left to measure."""
    return x + 1


def dbl(x: int) -> int:
    """The second trivial stage of the chained pipelines."""
    return 2 * x


def cpu_burn(x: int) -> int:
    """About 1 ms of pure-Python work that holds the GIL the whole time."""
    acc = x
    for i in range(CPU_LOOPS):
        acc = (acc * 31 + i) & 0xFFFFF
    return acc


def io_sleep(x: int) -> int:
    """A 10 ms blocking wait, the stand-in for a network call."""
    time.sleep(IO_SLEEP_S)
    return x


def io_sleep_short(x: int) -> int:
    """The 5 ms blocking wait of the mixed pipeline's first stage."""
    time.sleep(MIXED_SLEEP_S)
    return x


def array_sum(a: Any) -> float:
    """Read a whole payload array and return a scalar, so only the input is large."""
    return float(a.sum())


def blob_ones(b: bytes) -> int:
    """Read a whole payload of bytes and return how many of them are 1."""
    return b.count(1)


# --- stage functions (async twins for the task backend) ---------------------------


async def ainc(x: int) -> int:
    return x + 1


async def adbl(x: int) -> int:
    return 2 * x


async def aio_sleep(x: int) -> int:
    await asyncio.sleep(IO_SLEEP_S)
    return x


# --- item sources -------------------------------------------------------------------


def ints(n: int) -> Iterator[int]:
    """Lazily yield ``0 .. n-1``; a generator, so no peer can take its length."""
    yield from range(n)


def arrays(n: int) -> Iterator[Any]:
    """Lazily yield ``n`` fresh 1 MiB float64 arrays, array ``i`` filled with ``i``."""
    import numpy as np

    for i in range(n):
        yield np.full(PAYLOAD_ELEMENTS, float(i), dtype=np.float64)


def blobs(n: int) -> Iterator[bytes]:
    """Lazily yield ``n`` fresh 1 MiB ``bytes``, blob ``i`` filled with ``i % 256``."""
    for i in range(n):
        yield bytes((i % 256,)) * PAYLOAD_BYTES


# --- pipeline shapes --------------------------------------------------------------

SyncFn = Callable[[Any], Any]
AsyncFn = Callable[[Any], Coroutine[Any, Any, Any]]


@dataclass(frozen=True)
class StageSpec:
    """One stage, described independently of any library.

    Attributes:
        fn: The synchronous function.
        afn: Its ``async def`` twin, used where the backend is ``"task"``.
        backend: Where the stage runs.
        workers: Concurrent workers of the stage.
        chunk: Chunk size for peers that take one (``Pool.imap``, mpire, executors).
        buffer: Bound of the stage's output queue for peers that take one.
        timeout: Seconds one call may take (never reached here), for peers that can
            stop a call past it: typeflow, pypeln (``timeout``), mpire (``task_timeout``).
    """

    fn: SyncFn
    afn: AsyncFn | None
    backend: Backend
    workers: int = 2
    chunk: int = 1
    buffer: int | None = None
    timeout: float | None = None


ASYNC_TWINS: dict[SyncFn, AsyncFn] = {inc: ainc, dbl: adbl, io_sleep: aio_sleep}


def spec(
    fn: SyncFn,
    backend: Backend,
    workers: int = 2,
    chunk: int = 1,
    buffer: int | None = None,
    timeout: float | None = None,
) -> StageSpec:
    """Build a :class:`StageSpec`, attaching the async twin of ``fn`` when it has one."""
    return StageSpec(fn, ASYNC_TWINS.get(fn), backend, workers, chunk, buffer, timeout)


def compose(fns: tuple[SyncFn, ...]) -> SyncFn:
    """The plain serial chain of ``fns`` (the paired baseline), one call per stage."""
    if len(fns) == 1:
        return fns[0]
    if len(fns) == 2:
        f, g = fns
        return lambda x: g(f(x))
    if len(fns) == 3:
        f, g, h = fns
        return lambda x: h(g(f(x)))
    raise ValueError(f"compose takes 1 to 3 stages, got {len(fns)}")
