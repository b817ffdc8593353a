"""Adapters: one function per peer that runs a pipeline of :class:`StageSpec`.

Every runner has the same signature, ``runner(stages, items, sink)``: it builds the
pipeline with the peer's own API, feeds it ``items`` (a lazy generator), calls
``sink(result)`` once per output in the caller's thread (or, for the asyncio peers,
on the event loop's thread, which is the caller's), and returns only after every
pool, executor, process and thread it started has been shut down, so start-up and
teardown are inside the measured time.

The chunk size and buffer in a stage are passed to the peers that take them.  Known
quirks are kept as the peers behave by default, except where noted (pypeln's task
stages always get ``maxsize=0``: a bounded task stage iterated from sync code hangs).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import operator
import sys
import types
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing.pool import Pool, ThreadPool
from typing import Any

from workloads import StageSpec, compose

Sink = Callable[[Any], None]
Runner = Callable[[Sequence[StageSpec], Iterable[Any], Sink], None]
Stages = Sequence[StageSpec]


# --- reference: the plain serial chain ----------------------------------------------


def run_serial(stages: Stages, items: Iterable[Any], sink: Sink) -> None:
    """A generator chain in the caller: no concurrency, the floor for time and memory."""
    it: Iterable[Any] = items
    for st in stages:
        it = map(st.fn, it)
    for x in it:
        sink(x)


def serial_loop(stages: Stages, items: Iterable[Any], sink: Sink) -> None:
    """The paired serial baseline: one composed call per item."""
    f = compose(tuple(st.fn for st in stages))
    for x in items:
        sink(f(x))


# --- typeflow -------------------------------------------------------------------------


def _typeflow_stage(st: StageSpec) -> Any:
    from typeflow import stage

    kwargs: dict[str, Any] = {"workers": st.workers, "backend": st.backend}
    if st.backend == "sync":  # typeflow has no in-caller backend: one thread worker
        kwargs = {"workers": 1, "backend": "thread"}
    if st.buffer is not None:
        kwargs["buffer"] = st.buffer
    if st.timeout is not None:
        kwargs["timeout"] = st.timeout
    fn = st.afn if st.backend == "task" else st.fn
    return stage(**kwargs)(fn)


def run_typeflow(stages: Stages, items: Iterable[Any], sink: Sink) -> None:
    pipe = functools.reduce(operator.or_, [_typeflow_stage(st) for st in stages])
    for result in pipe.run(items, ordered=True):
        sink(result.unwrap())


# --- multiprocessing.Pool / ThreadPool ----------------------------------------------


def _pool_chain(
    stages: Stages, items: Iterable[Any], chunked: bool, stack: contextlib.ExitStack
) -> Iterator[Any]:
    it: Iterable[Any] = items
    for st in stages:
        if st.backend == "sync":
            it = map(st.fn, it)
            continue
        pool: Pool = ThreadPool(st.workers) if st.backend == "thread" else Pool(st.workers)
        stack.callback(_close_pool, pool)
        it = pool.imap(st.fn, it, chunksize=st.chunk if chunked else 1)
    return iter(it)


def _close_pool(pool: Pool) -> None:
    pool.close()
    pool.join()


def _run_pool(stages: Stages, items: Iterable[Any], sink: Sink, chunked: bool) -> None:
    with contextlib.ExitStack() as stack:
        for x in _pool_chain(stages, items, chunked, stack):
            sink(x)


def run_mp_pool(stages: Stages, items: Iterable[Any], sink: Sink) -> None:
    """``Pool``/``ThreadPool.imap`` with the stage's chunk size, one pool per stage."""
    _run_pool(stages, items, sink, chunked=True)


def run_mp_pool_c1(stages: Stages, items: Iterable[Any], sink: Sink) -> None:
    """The same without chunking: every item is its own task."""
    _run_pool(stages, items, sink, chunked=False)


# --- concurrent.futures ----------------------------------------------------------------


def run_cf(stages: Stages, items: Iterable[Any], sink: Sink) -> None:
    """``Executor.map`` per stage (chunk size on processes; threads take none)."""
    with contextlib.ExitStack() as stack:
        it: Iterable[Any] = items
        for st in stages:
            if st.backend == "sync":
                it = map(st.fn, it)
            elif st.backend == "thread":
                ex: Executor = stack.enter_context(ThreadPoolExecutor(st.workers))
                it = ex.map(st.fn, it)
            else:
                ex = stack.enter_context(ProcessPoolExecutor(st.workers))
                it = ex.map(st.fn, it, chunksize=st.chunk)
        for x in it:
            sink(x)


# --- joblib ------------------------------------------------------------------------


def run_joblib(stages: Stages, items: Iterable[Any], sink: Sink) -> None:
    """``Parallel(return_as="generator")`` per stage; threading or loky, auto batches."""
    from joblib import Parallel, delayed

    it: Iterable[Any] = items
    for st in stages:
        if st.backend == "sync":
            it = map(st.fn, it)
            continue
        backend = "threading" if st.backend == "thread" else "loky"
        par = Parallel(n_jobs=st.workers, backend=backend, return_as="generator")
        it = par(_delayed_calls(delayed(st.fn), it))
    for x in it:
        sink(x)


def _delayed_calls(call: Callable[..., Any], items: Iterable[Any]) -> Iterator[Any]:
    """``call(x)`` per item, with ``call`` bound now (a generator expression would look
    the loop variable up lazily and run every stage's tasks with the last stage's fn)."""
    return (call(x) for x in items)


# --- mpire -------------------------------------------------------------------------


def run_mpire(stages: Stages, items: Iterable[Any], sink: Sink) -> None:
    """``WorkerPool.imap`` per stage, threading or fork, with the stage's chunk size."""
    from mpire.pool import WorkerPool

    with contextlib.ExitStack() as stack:
        it: Iterable[Any] = items
        for st in stages:
            if st.backend == "sync":
                it = map(st.fn, it)
                continue
            method = "threading" if st.backend == "thread" else "fork"
            pool = stack.enter_context(WorkerPool(n_jobs=st.workers, start_method=method))
            it = pool.imap(st.fn, it, chunk_size=st.chunk, task_timeout=st.timeout)
        for x in it:
            sink(x)


# --- pypeln --------------------------------------------------------------------------


def import_pypeln() -> types.ModuleType:
    """Import pypeln, first stubbing ``pkg_resources`` if setuptools is absent.

    pypeln imports stopit, which still calls ``pkg_resources.get_distribution`` for
    its own version string; newer environments no longer ship setuptools.
    """
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        stub = types.ModuleType("pkg_resources")
        stub.get_distribution = lambda name: types.SimpleNamespace(  # type: ignore[attr-defined]
            version=importlib.metadata.version(name)
        )
        sys.modules["pkg_resources"] = stub
    return importlib.import_module("pypeln")


def run_pypeln(stages: Stages, items: Iterable[Any], sink: Sink) -> None:
    """pypeln's native stages (``maxsize`` = the stage buffer, 0 on task stages)."""
    pl: Any = import_pypeln()
    stage: Any = items
    for st in stages:
        maxsize, timeout = st.buffer or 0, st.timeout or 0
        if st.backend == "sync":
            stage = pl.sync.map(st.fn, stage)
        elif st.backend == "thread":
            stage = pl.thread.map(
                st.fn, stage, workers=st.workers, maxsize=maxsize, timeout=timeout
            )
        elif st.backend == "process":
            stage = pl.process.map(
                st.fn, stage, workers=st.workers, maxsize=maxsize, timeout=timeout
            )
        else:
            stage = pl.task.map(st.afn, stage, workers=st.workers, maxsize=0, timeout=timeout)
    for x in stage:
        sink(x)


# --- plain asyncio ---------------------------------------------------------------------

_END = object()
AsyncCall = Callable[[Any], Awaitable[Any]]


def _async_calls(stages: Stages, stack: contextlib.ExitStack) -> list[AsyncCall]:
    """One awaitable call per stage.

    A stage whose function has an ``async def`` twin runs as a coroutine even when the
    case asks for threads (the memory workload): that is how asyncio code is written.
    Other thread and process stages (the mixed pipeline) go through executors.
    """
    loop = asyncio.get_running_loop()
    calls: list[AsyncCall] = []
    for st in stages:
        if st.afn is not None and st.backend != "process":
            # asyncio's native way: a task, not an executor hop (a timeout per call)
            calls.append(st.afn if st.timeout is None else _with_timeout(st.afn, st.timeout))
        elif st.backend == "sync":
            calls.append(_as_async(st.fn))
        else:
            pool_cls = ThreadPoolExecutor if st.backend == "thread" else ProcessPoolExecutor
            ex = stack.enter_context(pool_cls(st.workers))
            calls.append(functools.partial(_in_executor, loop, ex, st.fn))
    return calls


def _with_timeout(afn: AsyncCall, timeout: float) -> AsyncCall:
    async def call(x: Any) -> Any:
        async with asyncio.timeout(timeout):
            return await afn(x)

    return call


def _as_async(fn: Callable[[Any], Any]) -> AsyncCall:
    async def call(x: Any) -> Any:
        return fn(x)

    return call


def _in_executor(
    loop: asyncio.AbstractEventLoop, ex: Executor, fn: Callable[[Any], Any], x: Any
) -> Awaitable[Any]:
    return loop.run_in_executor(ex, fn, x)


async def _queue_stage(
    call: AsyncCall,
    workers: int,
    inbox: asyncio.Queue[Any],
    outbox: asyncio.Queue[Any],
    ends_out: int,
) -> None:
    """Run ``workers`` tasks over ``inbox``; when all saw END, pass ``ends_out`` ENDs on."""

    async def worker() -> None:
        while (x := await inbox.get()) is not _END:
            await outbox.put(await call(x))

    await asyncio.gather(*(worker() for _ in range(workers)))
    for _ in range(ends_out):
        await outbox.put(_END)


async def _feed(items: Iterable[Any], queue: asyncio.Queue[Any], ends: int) -> None:
    for x in items:
        await queue.put(x)
    for _ in range(ends):
        await queue.put(_END)


async def _queue_pipeline(stages: Stages, items: Iterable[Any], sink: Sink) -> None:
    with contextlib.ExitStack() as stack:
        calls = _async_calls(stages, stack)
        maxsize = stages[0].buffer or 64
        queues: list[asyncio.Queue[Any]] = [asyncio.Queue(maxsize) for _ in range(len(stages) + 1)]
        ends = [st.workers for st in stages] + [1]  # the consumer needs one END
        tasks = [asyncio.create_task(_feed(items, queues[0], ends[0]))]
        for i, (st, call) in enumerate(zip(stages, calls, strict=True)):
            stage_run = _queue_stage(call, st.workers, queues[i], queues[i + 1], ends[i + 1])
            tasks.append(asyncio.create_task(stage_run))
        while (x := await queues[-1].get()) is not _END:
            sink(x)
        await asyncio.gather(*tasks)


def run_asyncio_queue(stages: Stages, items: Iterable[Any], sink: Sink) -> None:
    """Worker tasks per stage on bounded ``asyncio.Queue`` (64): the best plain pattern."""
    asyncio.run(_queue_pipeline(stages, items, sink))


async def _gather_pipeline(stages: Stages, items: Iterable[Any], sink: Sink) -> None:
    with contextlib.ExitStack() as stack:
        calls = _async_calls(stages, stack)
        limits = [asyncio.Semaphore(st.workers) for st in stages]

        async def one(x: Any) -> Any:
            for call, limit in zip(calls, limits, strict=True):
                async with limit:
                    x = await call(x)
            return x

        for x in await asyncio.gather(*(one(x) for x in items)):
            sink(x)


def run_asyncio_gather(stages: Stages, items: Iterable[Any], sink: Sink) -> None:
    """One coroutine per item through ``gather``, a ``Semaphore`` per stage."""
    asyncio.run(_gather_pipeline(stages, items, sink))


# --- registry -------------------------------------------------------------------------

RUNNERS: dict[str, Runner] = {
    "typeflow": run_typeflow,
    "serial": run_serial,
    "pypeln": run_pypeln,
    "mp_pool": run_mp_pool,
    "mp_pool_c1": run_mp_pool_c1,
    "cf": run_cf,
    "joblib": run_joblib,
    "mpire": run_mpire,
    "asyncio_queue": run_asyncio_queue,
    "asyncio_gather": run_asyncio_gather,
}

#: What each peer is, in the tables.
DESCRIPTIONS: dict[str, str] = {
    "typeflow": "typeflow (ordered=True, Result unwrapped)",
    "serial": "serial generator chain (reference)",
    "pypeln": "pypeln",
    "mp_pool": "Pool/ThreadPool.imap, chunked",
    "mp_pool_c1": "Pool/ThreadPool.imap, chunksize 1",
    "cf": "concurrent.futures Executor.map",
    "joblib": "joblib Parallel (threading/loky, generator)",
    "mpire": "mpire WorkerPool.imap",
    "asyncio_queue": "asyncio worker tasks + bounded Queue",
    "asyncio_gather": "asyncio gather + Semaphore",
}

#: The module whose import time a fresh interpreter measures, per peer.
IMPORT_MODULES: dict[str, str] = {
    "typeflow": "typeflow",
    "pypeln": "pypeln",
    "mpire": "mpire",
    "joblib": "joblib",
    "mp_pool": "multiprocessing.pool",
    "cf": "concurrent.futures",
    "asyncio_queue": "asyncio",
}
