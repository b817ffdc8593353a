"""Shared fixtures: every behaviour test runs on every backend, and leaves nothing behind."""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TypeVar

import psutil
import pytest
from hypothesis import HealthCheck, settings

from typeflow import Backend, Stage, stage
from typeflow._options import BACKENDS

# Property tests: a quick profile by default, a thorough one on demand
# (HYPOTHESIS_PROFILE=thorough uv run pytest tests/test_properties.py).
_QUIET = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile("default", max_examples=40, deadline=None, suppress_health_check=_QUIET)
settings.register_profile("thorough", max_examples=400, deadline=None, suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

A = TypeVar("A")
B = TypeVar("B")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each test that takes ``backend`` runs once per backend."""
    value: Backend = request.param
    return value


def on(backend: Backend, fn: Callable[[A], B], workers: int = 2, buffer: int = 16) -> Stage[A, B]:
    """``fn`` as a stage on ``backend`` (wrapped in ``async def`` for the task backend)."""
    if backend == "task":

        async def call(item: A) -> B:
            return fn(item)

        call.__qualname__ = fn.__qualname__
        return stage(workers=workers, backend="task", buffer=buffer)(call)
    return stage(workers=workers, backend=backend, buffer=buffer)(fn)


def _forkserver_pid() -> int | None:
    from multiprocessing import forkserver

    # multiprocessing offers no public way to find its helper processes.
    server = forkserver._forkserver  # pyright: ignore[reportPrivateUsage]
    pid: int | None = getattr(server, "_forkserver_pid", None)
    return pid


def _multiprocessing_servers() -> set[int | None]:
    """The long-lived helpers multiprocessing starts once per process (not workers)."""
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker  # pyright: ignore[reportPrivateUsage]
    return {_forkserver_pid(), getattr(tracker, "_pid", None)}


def worker_pids() -> list[int]:
    """The worker processes running now (forked directly, or by the forkserver)."""
    servers = _multiprocessing_servers()
    return [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in servers]


#: What an earlier test left running is blamed on that test alone, so that one
#: leak fails one test rather than every test after it.
_BLAMED_THREADS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
_BLAMED_PIDS: set[int] = set()


def _leftover_objects(timeout: float) -> tuple[list[threading.Thread], list[psutil.Process]]:
    deadline = time.monotonic() + timeout
    threads = [
        t
        for t in threading.enumerate()
        if t.name.startswith("typeflow:") and t not in _BLAMED_THREADS
    ]
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    servers = _multiprocessing_servers() | _BLAMED_PIDS
    procs = [p for p in psutil.Process().children(recursive=True) if p.pid not in servers]
    _, alive = psutil.wait_procs(procs, timeout=max(0.0, deadline - time.monotonic()))
    return [t for t in threads if t.is_alive()], alive


def leftovers(timeout: float = 3.0) -> tuple[list[str], list[int]]:
    """typeflow threads and worker processes (not multiprocessing's helper servers) still alive.

    Shutdown is synchronous, so normally nothing is found at once; the timeout
    only lets the kernel finish reaping a process that was just killed.
    """
    threads, procs = _leftover_objects(timeout)
    return [t.name for t in threads], [p.pid for p in procs]


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """After every test: no typeflow thread and no worker process is left."""
    yield
    threads, procs = _leftover_objects(3.0)
    _BLAMED_THREADS.update(threads)
    _BLAMED_PIDS.update(p.pid for p in procs)
    assert not threads, f"typeflow threads left running: {[t.name for t in threads]}"
    assert not procs, f"worker processes left running: {[p.pid for p in procs]}"
