"""The floors under four targets of issue 5 that typeflow has missed, or met by a hair, here.

* ``mixed``: the mixed pipeline (sleep 5 ms on 16 threads -> ~1 ms of CPU on 2
  processes -> ``x+1``), run by typeflow and the two best peers.  Besides the
  wall time it reads the CPU time the worker processes used
  (``RUSAGE_CHILDREN``) and the parent (``RUSAGE_SELF``, its threads
  included): on two cores no run can end before half of the sum, and a
  library whose parent took no CPU at all could not end before half of the
  workers' CPU, whatever it did.
* ``cpu``: the CPU-bound workload (about 1 ms of pure Python per item, 2
  processes), run by typeflow, ``ProcessPoolExecutor`` (the best peer) and
  a reference written by hand for this one job (a pipe per forked worker,
  batches of 4, two batches in flight per worker, pickle protocol 5, no
  helper thread, no ``Result``, no order), each against the serial loop
  timed in the same interpreter before and after the run: how far above the
  peers a library can get.
* ``bytes``: the 1 MiB ``bytes`` payload (fresh ``bytes`` from the benchmark's
  source into ``bytes.count`` on 2 processes), run by typeflow, mpire (the
  best peer) and references written by hand for this one job, each with 2
  forked workers, no pickle, no ``Result``, no order and two items in
  flight per worker.  ``socket``: a socket per worker; the parent
  ``sendall``s each item, the worker reads it straight into a new ``bytes``
  object (one copy by the kernel on each side; from one thread, the second
  item in flight waits in ``sendall`` until the worker reads it, and the
  other worker waits meanwhile).  ``shm``: 3 slots of 1 MiB
  per worker in memory shared before the fork; the parent copies each item
  into a free slot and sends its number, the worker copies it out into a
  new ``bytes``.  Each from the caller's thread alone, or (``-threads``) as
  a library's parent runs: a feeder thread makes the items into a bounded
  queue, a thread per worker sends and receives, the caller's thread
  collects.  How fast these items can move here at all.  Runs are of
  2 000 items, four times the benchmark's cell: mpire's start-up (about a
  tenth of a second) weighs less, so it moves faster here than there.
* ``threads``: 200 threads that do 10 waits of 10 ms each (2 000 items, the
  io workload's 200-thread case without any library), started by
  ``threading.Thread.start`` (which waits until each new thread runs) and by
  ``_thread.start_new_thread`` (which does not, and gives the threads no
  ``Thread`` object), with the moment the last thread began.  Each thread has
  its own fixed share, so this is what starting 200 threads costs, not a
  pipeline.

Each measurement runs in a fresh interpreter, the libraries in turn::

    uv run --group bench python benchmarks/floors.py [--repeats 5] [--only bytes ...]
"""

from __future__ import annotations

import _thread
import argparse
import importlib
import json
import mmap
import multiprocessing
import pickle
import queue
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import cast

HERE = Path(__file__).resolve().parent
MIXED_RUNNERS = ("typeflow", "cf", "mp_pool")
CPU_RUNNERS = ("typeflow", "cf", "reference")
BYTES_RUNNERS = ("typeflow", "mpire", "socket", "socket-threads", "shm", "shm-threads")
KINDS = ("mixed", "cpu", "threads", "bytes")
#: Items in flight per worker, and shared-memory slots per worker, of the references.
BYTES_IN_FLIGHT, BYTES_SLOTS = 2, 3
THREAD_STARTS = ("threading", "_thread")
THREADS, WAITS, WAIT_S = 200, 10, 0.010


def _mixed(name: str) -> dict[str, float]:
    import peers
    from suite import mixed_cases

    case = mixed_cases(quick=False)[0]
    runner = {"typeflow": peers.run_typeflow, "cf": peers.run_cf, "mp_pool": peers.run_mp_pool}
    _imported(name)
    out: list[object] = []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    own_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    runner[name](case.stages, iter(range(case.n)), out.append)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own_after = resource.getrusage(resource.RUSAGE_SELF)
    assert len(out) == case.n
    return {
        "n": case.n,
        "wall_s": wall,
        "workers_cpu_s": _cpu(after) - _cpu(before),
        "parent_cpu_s": _cpu(own_after) - _cpu(own_before),
    }


def _cpu(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def _imported(name: str) -> None:
    """Import what the runner imports when it first runs, before any clock starts
    (as the benchmark's cells do): the measurements are of running, not importing."""
    modules = {
        "typeflow": ("typeflow._backends._process", "typeflow._backends._thread"),
        "cf": ("concurrent.futures.process", "concurrent.futures.thread"),
        "mp_pool": ("multiprocessing.pool",),
        "reference": ("multiprocessing.connection",),
        "mpire": ("mpire.pool",),
    }
    for module in modules[name]:
        importlib.import_module(module)


def _cpu_bound(name: str) -> dict[str, float]:
    import peers
    from suite import cpu_cases
    from workloads import cpu_burn

    case = cpu_cases(quick=False)[0]
    n_serial = case.n // 5
    _imported(name)

    def serial_item() -> float:
        started = time.perf_counter()
        for i in range(n_serial):
            cpu_burn(i)
        return (time.perf_counter() - started) / n_serial

    before = serial_item()
    out: list[object] = []
    started = time.perf_counter()
    if name == "reference":
        _reference_map(cpu_burn, case.n, out.append)
    else:
        runner = {"typeflow": peers.run_typeflow, "cf": peers.run_cf}[name]
        runner(case.stages, iter(range(case.n)), out.append)
    wall = time.perf_counter() - started
    assert len(out) == case.n
    # The serial loop timed before and after the run, as the benchmark pairs it.
    return {"x_serial": (before + serial_item()) / 2 * case.n / wall}


def _serve(conn: Connection, fn: Callable[[int], int]) -> None:
    while data := conn.recv_bytes():
        conn.send_bytes(pickle.dumps([fn(x) for x in pickle.loads(data)], protocol=5))


def _reference_map(
    fn: Callable[[int], int], n: int, sink: Callable[[object], None], chunk: int = 4
) -> None:
    """``fn`` over ``range(n)`` on 2 forked workers, as lean as it gets (see the docstring)."""
    ctx = multiprocessing.get_context("fork")
    conns, procs = [], []
    for _ in range(2):
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(theirs, fn))
        proc.start()
        theirs.close()
        conns.append(mine)
        procs.append(proc)
    starts = iter(range(0, n, chunk))
    in_flight = dict.fromkeys(conns, 0)

    def send(conn: Connection) -> None:
        start = next(starts, None)
        if start is not None:
            conn.send_bytes(pickle.dumps(list(range(start, min(start + chunk, n))), protocol=5))
            in_flight[conn] += 1

    for conn in conns:
        send(conn)
        send(conn)
    while any(in_flight.values()):
        for ready in wait([c for c, k in in_flight.items() if k]):
            conn = cast("Connection", ready)
            for value in pickle.loads(conn.recv_bytes()):
                sink(value)
            in_flight[conn] -= 1
            send(conn)
    for conn in conns:
        conn.send_bytes(b"")
    for proc in procs:
        proc.join()


def _bytes(name: str) -> dict[str, float]:
    import peers
    from suite import payload_cases
    from workloads import PAYLOAD_BYTES

    case = next(c for c in payload_cases(quick=False) if "bytes" in c.name)
    n = case.n * 4  # a second or two: the start-up is not what is measured
    reference = name.split("-")[0] in ("socket", "shm")
    if not reference:
        _imported(name)
    out: list[object] = []
    started = time.perf_counter()
    if reference:
        shared = (
            None if name.startswith("socket") else mmap.mmap(-1, 2 * BYTES_SLOTS * PAYLOAD_BYTES)
        )
        _bytes_reference(n, out.append, shared, threaded=name.endswith("-threads"))
    else:
        runner = {"typeflow": peers.run_typeflow, "mpire": peers.run_mpire}[name]
        runner(case.stages, case.items(n), out.append)
    wall = time.perf_counter() - started
    # Blob i is filled with i % 256: those with i % 256 == 1 hold only ones.
    assert len(out) == n
    assert sum(cast("list[int]", out)) == PAYLOAD_BYTES * sum(i % 256 == 1 for i in range(n))
    return {"gb_s": n * PAYLOAD_BYTES / wall / 1e9}


def _bytes_worker(
    sock: socket.socket, shared: mmap.mmap | None, others: list[socket.socket]
) -> None:
    from workloads import PAYLOAD_BYTES, blob_ones

    for other in others:  # the parent's ends (its own, and earlier workers'): their EOF
        other.close()

    while True:
        if shared is None:
            data = sock.recv(PAYLOAD_BYTES, socket.MSG_WAITALL)
            if not data:
                return
            sock.sendall((blob_ones(data)).to_bytes(8, "little"))
            continue
        header = sock.recv(4, socket.MSG_WAITALL)
        if not header:
            return
        slot = int.from_bytes(header, "little")
        offset = slot * PAYLOAD_BYTES
        data = shared[offset : offset + PAYLOAD_BYTES]  # a copy, into a new bytes
        sock.sendall(header + blob_ones(data).to_bytes(8, "little"))


def _bytes_reference(
    n: int, sink: Callable[[object], None], shared: mmap.mmap | None, *, threaded: bool
) -> None:
    """The 1 MiB ``bytes`` of the benchmark's source through 2 forked workers, by socket
    or through shared memory, from one thread or from a feeder and a thread per
    worker (see the module's docstring)."""
    from workloads import PAYLOAD_BYTES, blobs

    ctx = multiprocessing.get_context("fork")
    socks: list[socket.socket] = []
    procs: list[multiprocessing.process.BaseProcess] = []
    free: list[list[int]] = []
    for w in range(2):
        mine, theirs = socket.socketpair()
        proc = ctx.Process(target=_bytes_worker, args=(theirs, shared, [*socks, mine]))
        proc.start()
        theirs.close()
        socks.append(mine)
        procs.append(proc)
        free.append(list(range(w * BYTES_SLOTS, (w + 1) * BYTES_SLOTS)))
    reply = 8 if shared is None else 12

    def send(w: int, item: bytes) -> None:
        if shared is None:
            socks[w].sendall(item)
        else:
            slot = free[w].pop()
            shared[slot * PAYLOAD_BYTES : (slot + 1) * PAYLOAD_BYTES] = item
            socks[w].sendall(slot.to_bytes(4, "little"))

    def receive(w: int) -> int:
        message = socks[w].recv(reply, socket.MSG_WAITALL)
        if shared is not None:
            free[w].append(int.from_bytes(message[:4], "little"))
        return int.from_bytes(message[-8:], "little")

    if threaded:
        _bytes_threads(blobs(n), sink, send, receive)
    else:
        _bytes_one_thread(blobs(n), sink, send, receive, socks)
    for sock in socks:
        sock.close()
    for worker in procs:
        worker.join()


def _bytes_one_thread(
    items: Iterator[bytes],
    sink: Callable[[object], None],
    send: Callable[[int, bytes], None],
    receive: Callable[[int], int],
    socks: list[socket.socket],
) -> None:
    """Make, send and collect from the caller's thread alone."""
    in_flight = [0, 0]

    def send_next(w: int) -> None:
        item = next(items, None)
        if item is not None:
            send(w, item)
            in_flight[w] += 1

    for w in (0, 1):
        for _ in range(BYTES_IN_FLIGHT):
            send_next(w)
    by_sock = {sock.fileno(): w for w, sock in enumerate(socks)}
    while any(in_flight):
        for ready in wait([s for w, s in enumerate(socks) if in_flight[w]]):
            w = by_sock[cast("socket.socket", ready).fileno()]
            sink(receive(w))
            in_flight[w] -= 1
            send_next(w)


def _bytes_threads(
    items: Iterator[bytes],
    sink: Callable[[object], None],
    send: Callable[[int, bytes], None],
    receive: Callable[[int], int],
) -> None:
    """Make the items in a feeder thread, send and receive in a thread per worker (the
    kernel's copies then run beside the Python of the others), collect in the caller's."""
    inbox: queue.Queue[bytes | None] = queue.Queue(maxsize=2 * BYTES_IN_FLIGHT)
    results: queue.Queue[int | None] = queue.Queue()

    def feed() -> None:
        for item in items:
            inbox.put(item)
        for _ in range(2):
            inbox.put(None)

    def pump(w: int) -> None:
        in_flight, more = 0, True
        while more or in_flight:
            while more and in_flight < BYTES_IN_FLIGHT:
                item = inbox.get()
                if item is None:
                    more = False
                else:
                    send(w, item)
                    in_flight += 1
            if in_flight:
                results.put(receive(w))
                in_flight -= 1
        results.put(None)

    threads = [
        threading.Thread(target=feed),
        *(threading.Thread(target=pump, args=(w,)) for w in (0, 1)),
    ]
    for thread in threads:
        thread.start()
    ended = 0
    while ended < 2:
        value = results.get()
        if value is None:
            ended += 1
        else:
            sink(value)
    for thread in threads:
        thread.join()


def _threads(how: str) -> dict[str, float]:
    began = [0.0] * THREADS
    done = threading.Semaphore(0)
    started = time.perf_counter()

    def work(i: int) -> None:
        began[i] = time.perf_counter() - started
        for _ in range(WAITS):
            time.sleep(WAIT_S)
        done.release()

    for i in range(THREADS):
        if how == "threading":
            threading.Thread(target=work, args=(i,), daemon=True).start()
        else:
            _thread.start_new_thread(work, (i,))
    for _ in range(THREADS):
        done.acquire()
    wall = time.perf_counter() - started
    return {"wall_s": wall, "last_began_s": max(began)}


def _one(kind: str, name: str) -> dict[str, float]:
    """One measurement in a fresh interpreter."""
    argv = [sys.executable, str(Path(__file__)), "--one", kind, name]
    completed = subprocess.run(argv, check=True, capture_output=True, text=True)
    result: dict[str, float] = json.loads(completed.stdout.splitlines()[-1])
    return result


def _ratios(
    title: str, table: dict[str, list[dict[str, float]]], key: str, names: tuple[str, str, str]
) -> None:
    """A table of each runner's median ``key``, and its ratio to one runner's."""
    column, base, base_name = names
    print(title)
    print(f"| runner | {column} | / {base_name}'s |")
    print("|---|---|---|")
    against = statistics.median(r[key] for r in table[base])
    for name, rows in table.items():
        value = statistics.median(r[key] for r in rows)
        print(f"| {name} | {value:.2f} | {value / against:.2f} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument(
        "--only", choices=KINDS, action="append", help="measure only this (repeatable)"
    )
    args = parser.parse_args()
    if not args.one:
        from run import compile_bytecode  # as the benchmark does: no compiling in a child

        print(compile_bytecode())
    if args.one:
        kind, name = args.one
        sys.path.insert(0, str(HERE))
        measure = {"mixed": _mixed, "cpu": _cpu_bound, "threads": _threads, "bytes": _bytes}[kind]
        print(json.dumps(measure(name)))
        return
    mixed: dict[str, list[dict[str, float]]] = {name: [] for name in MIXED_RUNNERS}
    threads: dict[str, list[dict[str, float]]] = {how: [] for how in THREAD_STARTS}
    cpu_bound: dict[str, list[dict[str, float]]] = {name: [] for name in CPU_RUNNERS}
    payload: dict[str, list[dict[str, float]]] = {name: [] for name in BYTES_RUNNERS}
    kinds = args.only or KINDS
    for _ in range(args.repeats):
        for kind, table, names in (
            ("mixed", mixed, MIXED_RUNNERS),
            ("cpu", cpu_bound, CPU_RUNNERS),
            ("threads", threads, THREAD_STARTS),
            ("bytes", payload, BYTES_RUNNERS),
        ):
            if kind in kinds:
                for name in names:
                    table[name].append(_one(kind, name))

    def median(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    if "mixed" in kinds:
        print(f"mixed pipeline, medians of {args.repeats} (ms for {mixed['cf'][0]['n']:.0f} items)")
        print(
            "| library | wall | workers' CPU | parent's CPU | (workers + parent) / 2 "
            "| wall / that |"
        )
        print("|---|---|---|---|---|---|")
        floors = []
        for name, rows in mixed.items():
            wall, cpu = median(rows, "wall_s"), median(rows, "workers_cpu_s")
            both = (cpu + median(rows, "parent_cpu_s")) / 2
            floors.append(cpu / 2)
            print(
                f"| {name} | {wall * 1e3:.0f} | {cpu * 1e3:.0f} | "
                f"{median(rows, 'parent_cpu_s') * 1e3:.0f} | {both * 1e3:.0f} | {wall / both:.2f} |"
            )
        best_peer = min(median(mixed[n], "wall_s") for n in MIXED_RUNNERS if n != "typeflow")
        print(
            f"a library whose parent took no CPU and whose workers never waited "
            f"(the workers' CPU / 2) would be {best_peer / min(floors):.2f}x the best peer"
        )
        print()
    if "cpu" in kinds:
        title = f"CPU-bound stage (about 1 ms per item, 2 processes), medians of {args.repeats}"
        _ratios(title, cpu_bound, "x_serial", ("x serial", "cf", "the best peer"))
    if "threads" in kinds:
        ideal = WAITS * WAIT_S
        print(
            f"{THREADS} threads x {WAITS} waits of {WAIT_S * 1e3:.0f} ms, medians of {args.repeats}"
        )
        print("| start | wall (ms) | % of ideal | last thread began (ms) |")
        print("|---|---|---|---|")
        for how, rows in threads.items():
            wall = median(rows, "wall_s")
            print(
                f"| {how} | {wall * 1e3:.0f} | {ideal / wall * 100:.0f} | "
                f"{median(rows, 'last_began_s') * 1e3:.0f} |"
            )
        print()
    if "bytes" in kinds:
        title = f"1 MiB bytes, 2 processes, medians of {args.repeats}"
        _ratios(title, payload, "gb_s", ("GB/s", "mpire", "mpire"))


if __name__ == "__main__":
    main()
