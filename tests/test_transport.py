"""The transport between workers: adaptive batches, the wire format, pipelined
process workers, forked first workers.  No timing is asserted anywhere."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import enum
import itertools
import os
import pickle
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from returns.result import Failure, Success

from typeflow import StageError, StatefulStage, WorkerCrashed, flat_map, keep, stage
from typeflow._backends._base import BatchSizer
from typeflow._backends._wire import (
    OUT_OF_BAND_MIN,
    RECV_BUFFER,
    REPLY_BUFFER,
    Wire,
    encode,
    lift,
)
from typeflow._runtime import _channel
from typeflow._runtime._channel import (
    Channel,
    ChannelAborted,
    ChannelClosed,
    EndOfChannel,
    Window,
)
from typeflow._runtime._kernel import Key, Outcome

pytestmark = pytest.mark.timeout(120)


# -- BatchSizer ----------------------------------------------------------------


def test_batches_start_with_one_item_and_double_while_items_are_cheap() -> None:
    sizer = BatchSizer(cap=256, target=0.002)
    limits = [sizer.limit]
    for _ in range(12):
        sizer.record(sizer.limit, sizer.limit * 1e-7)
        limits.append(sizer.limit)
    assert limits[:4] == [1, 2, 4, 8]
    assert limits[-1] == 256


def test_slow_items_are_taken_one_at_a_time() -> None:
    sizer = BatchSizer(cap=256, target=0.002)
    for _ in range(10):
        sizer.record(sizer.limit, sizer.limit * 1e-7)
    assert sizer.limit == 256
    sizer.record(256, 256 * 0.01)  # items became slow: 10 ms each
    assert sizer.limit == 1
    sizer.record(1, 0.01)
    assert sizer.limit == 1


def test_quick_items_are_taken_by_the_dozen_slow_ones_are_shared_out() -> None:
    sizer = BatchSizer(cap=256, target=0.002)
    sizer.record(100, 100 * 1e-7)  # 0.1 µs an item: 64 of them are worth one hand-off
    assert sizer.least(64, 0.0005) == 64
    sizer.record(1, 0.001)  # now about 0.5 ms an item: share them out
    assert sizer.least(64, 0.0005) == 1
    channel: Channel[int] = Channel(1000)
    channel.put_many(list(range(100)))
    assert len(channel.get_many(256, share=8)) == 13  # the fair share: ceil(100 / 8)
    assert len(channel.get_many(256, share=8, least=64)) == 64  # at least 64
    assert len(channel.get_many(10, share=8, least=64)) == 10  # never past the limit
    assert len(channel.get_many(256, share=8, least=64)) == 13  # what is left


def test_a_byte_budget_bounds_batches_of_big_items() -> None:
    sizer = BatchSizer(cap=1024, target=0.005, max_bytes=1 << 20)
    for _ in range(12):
        sizer.record(sizer.limit, sizer.limit * 1e-7, sizer.limit * (512 << 10))
    assert sizer.limit == 2


def test_take_columns_nowait_takes_a_fair_share() -> None:
    channel: Channel[tuple[Key, object]] = Channel(100, numbered=True)
    channel.put_values(list("abcdefghij"))
    assert channel.take_columns_nowait(100, share=2) == (range(5), list("abcde"))
    assert channel.take_columns_nowait(2, share=2) == (range(5, 7), list("fg"))
    assert channel.take_columns_nowait(100) == (range(7, 10), list("hij"))
    assert channel.take_columns_nowait(100) == ((), [])


# -- the wire ------------------------------------------------------------------


def _pair(*, worker: bool = False) -> tuple[Wire, Wire]:
    """Two wires on one socket; ``worker``: the second is a worker's end."""
    a, b = socket.socketpair()
    ca, cb = Connection(a.detach()), Connection(b.detach())
    wa, wb = Wire(ca), Wire(cb, worker=worker)
    ca.close()  # the wires hold their own descriptors
    cb.close()
    return wa, wb


def test_the_wire_carries_small_and_large_objects_with_out_of_band_buffers() -> None:
    left, right = _pair()
    try:
        big = bytearray(os.urandom(3 * OUT_OF_BAND_MIN))
        small = bytearray(b"abc")
        message = ((1, 2, (3, 0)), ("x", big, small, pickle.PickleBuffer(big), None))
        parts, size = encode(message)
        assert len(parts) >= 3  # header, pickle, and the large buffer(s) out of band
        received: list[object] = []
        reader = threading.Thread(target=lambda: received.append(right.recv()))
        reader.start()
        assert left.send(message) == size
        reader.join()
        seqs, items = cast("tuple[object, list[object]]", received[0])
        assert seqs == (1, 2, (3, 0))
        assert items[0] == "x"
        assert items[1] == big
        assert items[2] == small
        assert items[3] == big
        assert items[4] is None
        left.send(None)
        assert right.recv() is None
    finally:
        left.close()
        right.close()


def test_large_bytes_and_bytearrays_leave_out_of_band_and_arrive_as_they_were() -> None:
    # Pickle copies bytes and bytearrays into its stream whatever the protocol;
    # lifted, their data follows the pickle straight from their own memory.
    big_bytes = os.urandom(2 * OUT_OF_BAND_MIN)
    big_array = bytearray(os.urandom(OUT_OF_BAND_MIN))
    values: list[object] = [big_bytes, big_array, b"small", bytearray(b"tiny"), 7]
    assert lift([7, big_bytes]) == [7, big_bytes]  # a batch that does not begin with bytes
    parts, size = encode(lift(values))
    assert [memoryview(part).nbytes for part in parts[2:]] == [len(big_bytes), len(big_array)]
    assert encode(values)[0][2:] == []  # not lifted: all of it inside the pickle
    left, right = _pair()
    try:
        received: list[object] = []
        reader = threading.Thread(target=lambda: received.append(right.recv()))
        reader.start()
        assert left.send_parts(parts, size) == size
        reader.join(10)
        got = cast("list[object]", received[0])
        assert got == values
        assert [type(value) for value in got] == [bytes, bytearray, bytes, bytearray, int]
    finally:
        left.close()
        right.close()


def test_a_buffer_copied_out_is_read_into_again_and_a_kept_one_never_is() -> None:
    left, right = _pair()
    try:
        received: list[object] = []
        size = 2 * OUT_OF_BAND_MIN
        for round_ in range(4):  # bytes arrive as copies: their buffer is free again
            payload = [bytes([round_]) * size, bytearray([100 + round_]) * size]
            reader = threading.Thread(target=lambda: received.append(right.recv()))
            reader.start()
            left.send(lift(payload))
            reader.join(10)
        got = cast("list[list[bytes | bytearray]]", received)
        # Every value is still what was sent: a later message never lands in the
        # memory of an earlier bytearray (the value itself), nor of a bytes value.
        assert [[value[0], value[-1], len(value)] for pair in got for value in pair] == [
            [v, v, size] for round_ in range(4) for v in (round_, 100 + round_)
        ]
        assert [type(value) for value in got[0]] == [bytes, bytearray]
    finally:
        left.close()
        right.close()


@pytest.mark.parametrize("worker", [True, False])
def test_a_worker_reads_even_its_first_bytes_value_straight_into_place(worker: bool) -> None:
    # A copied value leaves its buffer as a spare for the next message; a value read
    # straight into a new bytes object leaves none.  Other wires read ahead at first.
    left, right = _pair(worker=worker)
    try:
        value = bytes([7]) * (3 * OUT_OF_BAND_MIN)
        left.send(lift([value]))
        assert right.recv() == [value]
        spare = right._spare  # pyright: ignore[reportPrivateUsage] - what was copied
        assert (spare == []) is worker
    finally:
        left.close()
        right.close()


def test_bytes_values_come_straight_into_new_bytes_and_the_stream_stays_in_step() -> None:
    # After a message with a large bytes value the wire reads no further than each
    # part needs, so the next bytes value is read by the kernel straight into a new
    # bytes object; the first one, and any whose first part came in with a read
    # ahead, are copied.  Mixed with bytearrays, small messages sent together, and
    # a read cut short (as by a signal), every message arrives whole and in order.
    left, right = _pair()
    size = 3 * OUT_OF_BAND_MIN
    messages: list[object] = [
        lift([bytes([1]) * size]),
        ("small", 1),
        lift([bytes([2]) * size, bytearray([3]) * size, b"tiny", bytes([4]) * (size + 1)]),
        ("small", 2),
        ("small", 3),
        lift([bytes([5]) * size]),
        lift([bytearray([6]) * size]),
        lift([bytes([7]) * size]),
    ]
    real = right._sock  # pyright: ignore[reportPrivateUsage] - cut one read short below

    class ShortOnce:
        """The socket, whose first whole-value read returns half (as a signal may)."""

        def __init__(self) -> None:
            self.cut = False

        def recv(self, size: int, flags: int = 0) -> bytes:
            if not self.cut and flags & socket.MSG_WAITALL:
                self.cut = True
                return real.recv(size // 2, flags)
            return real.recv(size, flags)

        def recv_into(self, buffer: memoryview, size: int = 0) -> int:
            return real.recv_into(buffer, size)

    short = ShortOnce()
    try:
        received: list[object] = []
        right._sock = cast("socket.socket", short)  # pyright: ignore[reportPrivateUsage] - the stand-in
        reader = threading.Thread(target=lambda: received.extend(right.recv() for _ in messages))
        reader.start()
        for message in messages:
            left.send(message)
        reader.join(10)
        assert short.cut

        def shown(message: object) -> object:
            if not isinstance(message, list):
                return message
            values = cast("list[bytes | bytearray]", message)
            return [(type(v).__name__, v[0], len(v)) for v in values]

        assert [shown(m) for m in received] == [
            [("bytes", 1, size)],
            ("small", 1),
            [("bytes", 2, size), ("bytearray", 3, size), ("bytes", 116, 4), ("bytes", 4, size + 1)],
            ("small", 2),
            ("small", 3),
            [("bytes", 5, size)],
            [("bytearray", 6, size)],
            [("bytes", 7, size)],
        ]
        assert not right.has_message()
    finally:
        right._sock = real  # pyright: ignore[reportPrivateUsage] - the socket back
        left.close()
        right.close()


def test_buffers_kept_for_reuse_stay_within_their_budget() -> None:
    # bytes values of a new size each, each read after a read ahead took its first
    # part (four small messages between them end the exact reads): the buffers
    # they were copied out of are kept for the next message, but no more than
    # SPARE_BYTES of them.
    from typeflow._backends._wire import SPARE_BYTES

    left, right = _pair()
    try:
        for i in range(12):
            value = bytes([i]) * ((1 << 20) + i)
            sender = threading.Thread(target=left.send, args=(lift([value]),))
            sender.start()  # (the socket's buffer may hold less than the value)
            sender.join(2)  # all sent before the read (if it fits): a read ahead takes a part
            assert right.recv() == [value]
            for j in range(4):
                left.send(("small", j))
                assert right.recv() == ("small", j)
        spare = right._spare  # pyright: ignore[reportPrivateUsage] - the budget under test
        assert 0 < sum(map(len, spare)) <= SPARE_BYTES
    finally:
        left.close()
        right.close()


def test_the_wire_carries_more_buffers_than_one_sendmsg_takes() -> None:
    left, right = _pair()
    try:
        message = [bytearray(bytes([i % 251]) * OUT_OF_BAND_MIN) for i in range(1100)]
        received: list[object] = []
        reader = threading.Thread(target=lambda: received.append(right.recv()))
        reader.start()
        left.send(message)
        reader.join()
        assert received[0] == message
    finally:
        left.close()
        right.close()


def test_a_worker_sends_consecutive_keys_back_as_a_range() -> None:
    from typeflow._backends import _process_child

    reply = _process_child._reply  # pyright: ignore[reportPrivateUsage] - the unit under test

    left, right = socket.socketpair()
    sender, receiver = Wire(left), Wire(right)
    sent: list[tuple[Key, ...]] = [(5, 6, 7), (5, 7, 6), ((5, 0), (5, 1))]
    for keys in sent:
        reply(sender, "stage", keys, Outcome(keys=keys, values=list(range(len(keys)))), 0.0)
    got = [cast("_process_child.Reply", receiver.recv())[0].keys for _ in sent]
    assert got == [range(5, 8), (5, 7, 6), ((5, 0), (5, 1))]
    for wire, end in ((sender, left), (receiver, right)):
        wire.close()
        end.close()


def test_an_outcome_crosses_to_the_parent_with_every_field() -> None:
    # Outcome pickles its fields as a tuple: a field added without it would be lost.
    values: dict[str, object] = {
        "ok": [(7, "seven")],
        "failed": [(8, StageError("s", 8, ValueError(8)))],
        "retries": 2,
        "deltas": [(9, -1)],
        "filtered": 1,
        "keys": range(3, 5),
        "values": ["three", "four"],
        "whole": [3],
        "span": range(3, 5),
    }
    assert [f.name for f in dataclasses.fields(Outcome)] == list(values)
    outcome = Outcome(**values)  # type: ignore[arg-type] # each field's own type, above
    back = pickle.loads(pickle.dumps(outcome, protocol=5))
    assert isinstance(back, Outcome)
    for name, value in values.items():
        if name != "failed":  # an exception is equal only to itself
            assert getattr(back, name) == value, name
    ((key, error),) = back.failed
    assert (key, error.stage, error.item, error.exception.args) == (8, "s", 8, (8,))


def test_a_batch_is_one_span_only_if_its_roots_are_consecutive_in_order_and_whole() -> None:
    from typeflow._options import StageOptions
    from typeflow._runtime._kernel import FnKernel, WorkerContext

    def small(n: int) -> bool:  # fails on 99
        if n == 99:
            raise ValueError(n)
        return n < 5

    def twice(n: int) -> list[int]:
        return [n, n]

    ctx = WorkerContext(0)
    keep = FnKernel("small", small, False, StageOptions(), kind="keep")
    flat = FnKernel("twice", twice, False, StageOptions(), kind="flat")
    batches: list[tuple[Sequence[Key], list[int]]] = [
        ((3, 4, 5, 6), [3, 4, 5, 6]),
        (range(3, 7), [3, 4, 5, 6]),
        ((4, 3, 5, 6), [4, 3, 5, 6]),  # out of order: released so, they would be wrong
        ((3, 4, 6), [3, 4, 6]),  # a gap: root 5 is not in the batch
        ((3, 4, 5), [1, 99, 2]),  # the filter fails on one item
        (((3, 0), (3, 1)), [1, 2]),  # children of a root split upstream
    ]
    spans = [
        (keep.process_columns(keys, items, ctx).span, flat.process_columns(keys, items, ctx).span)
        for keys, items in batches
    ]
    assert spans == [
        (range(3, 7), range(3, 7)),
        (range(3, 7), range(3, 7)),
        (None, None),
        (None, None),
        (None, range(3, 6)),
        (None, None),
    ]


def test_a_numbered_channel_numbers_its_items_on_the_way_out() -> None:
    # A run's first buffer: bare items in, envelopes (position, item) or columns out.
    channel: Channel[tuple[Key, object]] = Channel(100, numbered=True)
    window = Window(100)
    channel.pour("abc", window, 4)
    channel.put_values(["d", "e", "f", "g"])
    assert channel.get_many(2) == [(0, "a"), (1, "b")]
    assert channel.get_columns(3) == (range(2, 5), ["c", "d", "e"])
    assert channel.take_columns_nowait(10) == (range(5, 7), ["f", "g"])
    assert channel.take_columns_nowait(10) == ((), [])
    assert channel.taken == 7


def test_columns_of_an_unnumbered_channel_split_its_envelopes() -> None:
    channel: Channel[tuple[Key, object]] = Channel(100)
    channel.put_many([((3, 0), "x"), ((3, 1), "y"), (5, "z")])
    assert channel.get_columns(2) == (((3, 0), (3, 1)), ["x", "y"])
    assert channel.get_many(10) == [(5, "z")]


def test_a_numbered_channel_weighs_its_bare_items() -> None:
    channel: Channel[tuple[Key, object]] = Channel(100, max_bytes=1 << 20, numbered=True)
    channel.put_values([bytes(700 << 10)])
    assert channel._has_room()  # pyright: ignore[reportPrivateUsage] - the budget is internal
    channel.put_values([bytes(700 << 10)])
    assert not channel._has_room()  # pyright: ignore[reportPrivateUsage] - the budget is internal
    keys, items = channel.get_columns(10)
    assert keys == range(2)
    assert [len(cast("bytes", item)) for item in items] == [700 << 10] * 2
    assert channel._has_room()  # pyright: ignore[reportPrivateUsage] - the budget is internal


@pytest.mark.timeout(30)
def test_small_items_count_for_nothing_against_the_byte_budget() -> None:
    # 8 items, 8 KiB: items under 1 KiB are bounded by the count alone.
    channel: Channel[tuple[Key, object]] = Channel(8, max_bytes=8 << 10, numbered=True)
    window = Window(100)
    channel.pour([bytes(9 << 10), b"a", b"b"], window, 8)  # the budget is spent: a, b go in
    assert len(channel) == 3
    big = threading.Thread(target=channel.pour, args=([bytes(2 << 10)], window, 8))
    big.start()  # a big item waits for the budget
    assert channel.get_columns(1) == (range(1), [bytes(9 << 10)])
    big.join(10)
    assert not big.is_alive()
    assert channel.get_columns(10) == (range(1, 4), [b"a", b"b", bytes(2 << 10)])


def _double(x: int) -> int:
    return 2 * x


def test_a_thread_stage_passes_the_first_buffer_s_keys_on_as_a_range() -> None:
    from typeflow._runtime._kernel import WorkerContext

    node = stage(backend="thread")(_double)._nodes()[0]  # pyright: ignore[reportPrivateUsage] - the stage's kernel is internal
    channel: Channel[tuple[Key, object]] = Channel(100, numbered=True)
    channel.put_values([1, 2, 3])
    outcome = node.kernel.process_columns(*channel.get_columns(10), WorkerContext(0))
    assert outcome.keys == range(3)
    assert outcome.envelopes() == [(0, 2), (1, 4), (2, 6)]


def test_the_wire_keeps_what_it_read_past_a_message_for_the_next() -> None:
    left, right = _pair()
    try:
        for i in range(3):  # small messages: one recv call may read them all
            left.send(("small", i))
        big = list(range(RECV_BUFFER // 2))  # a pickle larger than the receive buffer
        reader_got: list[object] = []
        reader = threading.Thread(
            target=lambda: reader_got.extend(right.recv() for _ in range(5)), daemon=True
        )
        reader.start()
        left.send(big)
        left.send(("after", None))
        reader.join(30)
        assert reader_got == [("small", 0), ("small", 1), ("small", 2), big, ("after", None)]
        assert not right.has_message()
        left.send("next")
        assert right.recv() == "next"
    finally:
        left.close()
        right.close()


def test_a_message_already_received_is_known_to_be_there() -> None:
    left, right = _pair()
    try:
        left.send("one")
        left.send("two")
        assert right.recv() == "one"  # the first read takes both (they are small)
        assert right.has_message()
        assert right.recv() == "two"
        assert not right.has_message()
    finally:
        left.close()
        right.close()


def test_a_worker_reads_while_its_socket_is_full_so_neither_side_waits_for_the_other() -> None:
    # The parent sends a batch while the worker sends a reply, each larger than any
    # socket buffer: neither would return if the worker did not read meanwhile.
    parent, worker = _pair(worker=True)
    batch = bytes(range(256)) * (64 * 1024)  # 16 MiB
    reply = bytearray(os.urandom(16 << 20))
    replies: list[object] = []

    def parent_side() -> None:
        parent.send(batch)
        replies.append(parent.recv())

    sender = threading.Thread(target=parent_side, daemon=True)
    try:
        sender.start()
        worker.send(reply)
        buffered = len(worker._buf)  # pyright: ignore[reportPrivateUsage] - the read ahead
        assert buffered > RECV_BUFFER  # it holds the batch, read while the reply went out
        assert worker.recv() == batch
        sender.join(60)
        assert replies == [reply]
        assert len(worker._buf) == RECV_BUFFER  # pyright: ignore[reportPrivateUsage] - given back
        parent.send("and on")
        assert worker.recv() == "and on"
        worker.send("in step")
        assert parent.recv() == "in step"
    finally:
        parent.close()
        worker.close()


def test_the_wire_raises_eof_when_the_other_end_is_gone() -> None:
    left, right = _pair()
    left.close()
    with pytest.raises(EOFError):
        right.recv()
    right.close()


# -- process workers -----------------------------------------------------------


def fail_on_sevens(x: int) -> int:
    if x % 7 == 0:
        raise ValueError(x)
    return x * 2


def test_pipelined_batches_keep_every_item_and_failure_in_order() -> None:
    n = 20_000
    results = list(stage(workers=2, backend="process")(fail_on_sevens).run(range(n)))
    assert len(results) == n
    for x, result in enumerate(results):
        if x % 7 == 0:
            assert isinstance(result, Failure)
            error = result.failure()
            assert isinstance(error, StageError)
            assert error.item == x
            assert isinstance(error.exception, ValueError)
        else:
            assert result == Success(2 * x)


def size_of(data: bytes | bytearray) -> int:
    return len(data)


def echo(data: bytes | bytearray) -> bytes | bytearray:
    return data


@pytest.mark.parametrize("kind", [bytearray, bytes])
def test_large_payloads_cross_both_ways(kind: type[bytes | bytearray]) -> None:
    payloads = [kind(bytes([i]) * ((1 << 20) + i)) for i in range(12)]
    sizes = list(stage(workers=2, backend="process")(size_of).run(payloads))
    assert [r.unwrap() for r in sizes] == [len(p) for p in payloads]
    echoed = [r.unwrap() for r in stage(workers=2, backend="process")(echo).run(payloads)]
    assert echoed == payloads
    assert {type(value) for value in echoed} == {kind}


def grow(data: bytes) -> bytes:
    """More than the worker's socket takes (Linux doubles the size asked for)."""
    return data * (2 * REPLY_BUFFER // len(data) + 1)


def test_replies_larger_than_the_socket_buffers_while_batches_pipeline() -> None:
    # Each item's reply is more than the worker's socket takes, while the parent
    # sends the next batch: the worker reads it meanwhile.
    payloads = [bytes([i]) * (1 << 20) for i in range(12)]
    results = list(stage(workers=2, backend="process")(grow).run(payloads))
    assert [r.unwrap() for r in results] == [grow(p) for p in payloads]


def test_a_short_input_too_heavy_for_the_byte_budget_is_fed_by_a_thread() -> None:
    # Three items of 4 MiB, over a process stage's 8 MiB budget: the caller cannot
    # put them in at once, so a feeder does, one by one, as the stage takes them.
    payloads = [bytearray(bytes([i]) * (4 << 20)) for i in range(3)]
    sizes = list(stage(workers=2, backend="process")(size_of).run(payloads))
    assert [r.unwrap() for r in sizes] == [4 << 20] * 3


class _WholeBatches(BatchSizer):
    """Batches of up to 100 items from the first one on."""

    def __init__(self, cap: int, target: float, max_bytes: int = 0) -> None:
        super().__init__(cap, target, max_bytes)
        self.limit = 100

    def least(self, count: int, seconds: float) -> int:
        return self.limit

    def record(self, items: int, seconds: float, nbytes: int = 0) -> None:
        pass


class TornDown(StatefulStage[int, int], workers=1, backend="process"):
    """x + 1, except that 250 kills its worker; each worker that ends leaves a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def process(self, x: int, /) -> int:
        if x == 250:
            os._exit(9)
        return x + 1

    def teardown(self) -> None:
        Path(self.path, str(os.getpid())).touch()


def test_a_worker_told_to_stop_after_its_last_batch_may_still_crash_in_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The whole input goes out as one batch, the request to stop right behind it;
    # the worker dies on the batch's first item instead.  Each item then runs on
    # its own in a fresh worker, and the last of those must be told to stop as
    # well: it ends politely (its teardown runs), not killed after a wait.
    from typeflow._backends import _process

    monkeypatch.setattr(_process, "BatchSizer", _WholeBatches)
    results = list(TornDown(str(tmp_path)).run(range(250, 260)))
    assert isinstance(results[0].failure().exception, WorkerCrashed)
    assert [r.unwrap() for r in results[1:]] == list(range(252, 261))
    assert len(list(tmp_path.iterdir())) == 1  # the worker that ran 251-259


def crash_on_marked(path: str) -> Callable[[int], int]:
    def crash(x: int) -> int:
        if x % 500 == 250 and not Path(path, str(x)).exists():
            Path(path, str(x)).touch()
            os._exit(9)
        return x + 1

    return crash


def test_a_crash_with_two_batches_in_flight_loses_nothing(tmp_path: Path) -> None:
    n = 3000
    fn = crash_on_marked(str(tmp_path))
    run = stage(workers=2, backend="process", retries=1, backoff=0.001)(fn).run(range(n))
    results = list(run)
    assert [r.unwrap() for r in results] == [x + 1 for x in range(n)]
    assert run.statistics().stages[0].restarts == n // 500


def crash_on_250s(x: int) -> int:
    if x % 500 == 250:
        os._exit(9)
    return x + 1


def test_without_retries_only_the_item_that_kills_fails() -> None:
    n = 1200
    results = list(stage(workers=2, backend="process")(crash_on_250s).run(range(n)))
    failed = [x for x, r in enumerate(results) if isinstance(r, Failure)]
    assert failed == [250, 750]
    for x in failed:
        assert isinstance(results[x].failure().exception, WorkerCrashed)


def thirds_crashing_once(path: str) -> Callable[[int], bool]:
    """Keeps multiples of 3; the first call on 250 kills its worker."""

    def third(x: int) -> bool:
        if x == 250 and not Path(path, "kept").exists():
            Path(path, "kept").touch()
            os._exit(9)
        return x % 3 == 0

    return third


def doubled_thirds_crashing_once(path: str) -> Callable[[int], list[int]]:
    """Two outputs for a multiple of 3, none otherwise; the first call on 250 kills."""

    def doubled(x: int) -> list[int]:
        if x == 250 and not Path(path, "flat").exists():
            Path(path, "flat").touch()
            os._exit(9)
        return [x, x] if x % 3 == 0 else []

    return doubled


@pytest.mark.parametrize("ordered", [True, False])
def test_a_crash_keeps_what_filters_and_flat_maps_dropped_or_added(
    tmp_path: Path, ordered: bool
) -> None:
    # The batch that held 250 is run again item by item: the items a filter drops
    # (or a one-to-many stage multiplies) there must still be accounted for, or
    # the run loses every result behind them.
    n = 1000
    thirds = [x for x in range(n) if x % 3 == 0]
    kept = keep(thirds_crashing_once(str(tmp_path)), workers=2, backend="process")
    run = kept.run(range(n), ordered=ordered)
    values = [r.unwrap() for r in run]
    assert values == thirds if ordered else sorted(values) == thirds
    stats = run.statistics().stages[0]
    assert (stats.succeeded, stats.filtered, stats.restarts) == (len(thirds), n - len(thirds), 1)
    fn = doubled_thirds_crashing_once(str(tmp_path))
    run2 = flat_map(workers=2, backend="process")(fn).run(range(n), ordered=ordered)
    values = [r.unwrap() for r in run2]
    doubled = [x for x in thirds for _ in range(2)]
    assert values == doubled if ordered else sorted(values) == doubled


def test_two_process_stages_in_a_row() -> None:
    pipeline = stage(workers=2, backend="process")(fail_on_sevens) | stage(
        workers=2, backend="process"
    )(fail_on_sevens)
    results = list(pipeline.run(range(1, 200), ordered=True))
    expected = [4 * x if x % 7 and (2 * x) % 7 else None for x in range(1, 200)]
    assert [r.unwrap() if isinstance(r, Success) else None for r in results] == expected


def test_a_byte_budget_bounds_a_channel_by_size_as_well_as_by_count() -> None:
    channel: Channel[tuple[int, bytes]] = Channel(100, max_bytes=1 << 20)
    channel.put_many([(0, bytes(600 << 10))])
    assert channel._has_room()  # pyright: ignore[reportPrivateUsage] - the budget is internal
    channel.put_many([(1, bytes(600 << 10)), (2, b"x")])  # admitted whole while there is room
    assert not channel._has_room()  # pyright: ignore[reportPrivateUsage] - the budget is internal
    blocked = threading.Thread(target=channel.put_many, args=([(3, b"y")],))
    blocked.start()
    assert [key for key, _ in channel.get_many(2)] == [0, 1]
    blocked.join()
    assert [key for key, _ in channel.get_many(10)] == [2, 3]
    assert channel._has_room()  # pyright: ignore[reportPrivateUsage] - the budget is internal


def _weight_of(values: Sequence[object], small: int) -> int:
    """What a byte budget counts of ``values``: each one's ``sys.getsizeof`` from
    ``small`` up (the reference the channel's quicker ways must agree with)."""
    return sum(w for v in values if (w := sys.getsizeof(v)) >= small)


def _counted(channel: Channel[object]) -> int:
    return channel._bytes_in - channel._bytes_out  # pyright: ignore[reportPrivateUsage] - the count is internal


#: Numbers of every kind, ints past what a budget's smallest counted weight
#: allows; ints alone and the others alone take quicker paths than a mix.
_NUMBERS: list[list[object]] = [
    [10**400, 1.5, 2j, True, None, 7, -(10**400), 0, False],
    [10**400, 7, True, -(10**400), 0, 1 << 40],
    [1.5, 2j, True, None, float("nan"), False],
    # (and values whose length tells what they weigh, of one type and mixed)
    ["x", "y" * 700, "", "\U0001f600" * 3],
    [b"z", bytes(2000), (1, 2), (0,) * 300, "x", "y" * 700, 7],
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("numbers", _NUMBERS)
# 16: every number counts; 64: only the big ints; 1 KiB: short str, bytes, tuples do not
@pytest.mark.parametrize("small", [16, 64, 1 << 10])
@pytest.mark.parametrize(
    ("method", "numbered"),
    [
        ("put_many", True),
        ("put_many", False),
        ("offer", True),
        ("offer", False),
        ("put_chunk", True),
        ("aput_many", False),
        ("offer_values", True),
        ("put_solo", True),
        ("pour", True),
    ],
)
def test_numbers_weigh_what_they_weigh_through_every_put(
    method: str, numbered: bool, small: int, numbers: list[object]
) -> None:
    # Numbers are not weighed one by one where their type and magnitude tell they
    # count for nothing, and are where they may count: the count is the same.
    channel: Channel[object] = Channel(1000, max_bytes=small * 1000, numbered=numbered)
    batch: list[object] = numbers if numbered else list(enumerate(numbers))
    if method == "pour":
        channel.pour(batch, Window(100), 8)
    elif method == "put_solo":
        for item in batch:
            channel.put_solo(item)
    elif method == "aput_many":
        asyncio.run(channel.aput_many(batch))
    else:
        getattr(channel, method)(batch)
    assert _counted(channel) == _weight_of(numbers, small)


def _near_power_of_two(bits: int, offset: int) -> int:
    return (1 << bits) + offset


def _negative_power_of_two(bits: int) -> int:
    return -(1 << bits)


_any_value = st.one_of(
    st.integers(),
    st.builds(_near_power_of_two, st.integers(0, 62_000), st.integers(-2, 2)),
    st.builds(_negative_power_of_two, st.integers(0, 62_000)),
    st.floats(allow_nan=True),
    st.complex_numbers(),
    st.none(),
    st.booleans(),
    st.binary(max_size=100),
    st.text(max_size=20),
)


@given(
    st.lists(_any_value, max_size=8),
    st.sampled_from([1, 16, 28, 29, 32, 33, 64, 1 << 10, 8 << 10]),
    st.booleans(),
)
def test_a_batch_weighs_what_getsizeof_says_however_it_is_weighed(
    values: list[object], small: int, numbered: bool
) -> None:
    channel: Channel[object] = Channel(1000, max_bytes=small * 1000, numbered=numbered)
    batch: list[object] = values if numbered else list(enumerate(values))
    weigh, weigh_one = channel._weigh, channel._weigh_one  # pyright: ignore[reportPrivateUsage] - the weighing is internal
    assert weigh(batch) == _weight_of(values, small)
    assert [weigh_one(item) for item in batch] == [_weight_of([v], small) for v in values]


def test_the_int_bound_is_where_an_int_starts_to_count() -> None:
    # The channel's bound on an int's magnitude, held to sys.getsizeof: just
    # under it an int counts for nothing; at it an int counts, unless the bound
    # was capped (a bound of a budget's size would itself be that big).
    for small in [*range(1, 80), 1 << 10, 8 << 10, 1 << 20]:
        bound = _channel._int_bound(small)  # pyright: ignore[reportPrivateUsage] - the bound is internal
        assert bound.bit_length() <= 1 + 30 * 4  # capped: a small int whatever the budget
        if bound:
            assert sys.getsizeof(bound - 1) < small
            assert sys.getsizeof(-(bound - 1)) < small
            assert small <= sys.getsizeof(bound) or bound.bit_length() == 1 + 30 * 4, small
        else:
            assert sys.getsizeof(1 << 30) >= small  # only ints of one digit or none could be under


class _Small(enum.IntEnum):
    A = 1


class _Int(int):
    pass


class _Float(float):
    pass


class _Odd(type):
    """A metaclass that makes its classes unhashable."""

    def __eq__(cls, other: object) -> bool:
        return cls is other

    __hash__ = None  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType] - unhashable on purpose


class _OddValue(metaclass=_Odd):
    def __sizeof__(self) -> int:
        return 1 << 20


def _edges(small: int) -> list[object]:
    bound = _channel._int_bound(small)  # pyright: ignore[reportPrivateUsage] - the bound is internal
    ints = [0, 1, -1, bound - 1, bound, bound + 1, 2 * bound, 1 - bound, -bound, -bound - 1]
    return [*ints, True, False, None, 0.5, float("nan"), -0.0, 2j, _Small.A, _Int(1), _Float(1.0)]


def _weighed_as_getsizeof_says(
    small: int,
    numbered: bool,
    edges: list[object],
    batches: Callable[[object], list[list[object]]],
    stream: list[object],
) -> None:
    """Each of ``edges`` in each of its ``batches`` through ``_weigh`` and alone
    through ``_weigh_one``, and ``stream`` through ``pour``, weigh what
    ``sys.getsizeof`` says under a budget whose smallest counted weight is ``small``."""
    channel: Channel[object] = Channel(1000, max_bytes=small * 1000, numbered=numbered)
    weigh, weigh_one = channel._weigh, channel._weigh_one  # pyright: ignore[reportPrivateUsage] - the weighing is internal

    def wrap(values: list[object]) -> list[object]:
        return values if numbered else list(enumerate(values))

    for v in edges:
        for values in batches(v):
            assert weigh(wrap(values)) == _weight_of(values, small), (small, values)
        assert weigh_one(wrap([v])[0]) == _weight_of([v], small), (small, v)
    if numbered:
        # (Room for all of it: a pour into a full channel would wait.)
        poured: Channel[object] = Channel(100_000, max_bytes=small * 100_000, numbered=True)
        poured.pour(stream, Window(1000), 8)
        assert _counted(poured) == _weight_of(stream, small)


@pytest.mark.parametrize("small", [24, 28, 29, 32, 33, 36, 64, 8 << 10])
@pytest.mark.parametrize("numbered", [True, False])
def test_numbers_at_the_edges_weigh_what_getsizeof_says(small: int, numbered: bool) -> None:
    # Each number alone, and first, last or in the middle of a batch of ints, of
    # bools or of other numbers (the quick paths), through _weigh, _weigh_one, pour.
    def batches(v: object) -> list[list[object]]:
        return [[v], [v, 0], [0, v], [0, v, 0], [v, True], [False, v], [v, 0.5], [None, v]]

    edges = _edges(small)
    _weighed_as_getsizeof_says(small, numbered, edges, batches, edges)


class _Str(str):
    def __sizeof__(self) -> int:  # heavier than its length tells
        return 4096


class _Bytes(bytes):
    pass


class _Tuple(tuple[int, ...]):
    __slots__ = ()

    def __sizeof__(self) -> int:  # heavier than its length tells
        return 4096


def _cache_other_forms(text: str) -> None:
    """Make CPython keep the copies of ``text`` that ``sys.getsizeof`` counts beside
    its characters: a UTF-8 one, and before 3.12 a ``wchar_t`` one."""
    api = ctypes.pythonapi
    as_utf8 = api.PyUnicode_AsUTF8AndSize
    as_utf8.argtypes = [ctypes.py_object, ctypes.c_void_p]
    as_utf8.restype = ctypes.c_void_p
    if all(ord(c) < 0xD800 or ord(c) > 0xDFFF for c in text):  # (a lone surrogate has none)
        as_utf8(text, None)
    as_unicode = getattr(api, "PyUnicode_AsUnicode", None)  # gone in 3.12, with the copy
    if as_unicode is not None:
        as_unicode.argtypes = [ctypes.py_object]
        as_unicode.restype = ctypes.c_void_p
        as_unicode(text)


_texts = st.one_of(
    st.text(st.characters(max_codepoint=0x7F), max_size=2000),
    st.text(st.characters(max_codepoint=0xFF), max_size=2000),
    st.text(st.characters(max_codepoint=0xFFFF), max_size=2000),
    st.text(max_size=2000),
)


@pytest.mark.parametrize("char", ["a", "\xe9", "\u07ff", "\u0800", "\u20ac", "\U0001f600"])
@pytest.mark.parametrize("length", [0, 1, 2, 10, 100, 1000])
@pytest.mark.parametrize("cached", [False, True])
def test_a_str_of_each_kind_weighs_no_more_than_its_length_tells(
    char: str, length: int, cached: bool
) -> None:
    # One or two bytes per character in UTF-8 (ASCII, Latin-1, up to U+07FF), three
    # (the rest of the BMP), four (beyond): the bound must hold for the longest.
    # (Here the most is 9 bytes per character, in the BMP: 2 + 3 in UTF-8 + a
    # 4-byte wchar_t; the bound's 12 is for a 2-byte wchar_t, where a character
    # beyond the BMP takes two of them beside its 4 bytes and 4 in UTF-8.)
    text = "".join([char * length, ""])
    if cached and length:  # (the empty str is shared: left alone)
        _cache_other_forms(text)
    base, per = _channel._STR_SHAPE  # pyright: ignore[reportPrivateUsage] - the bound is internal
    assert sys.getsizeof(text) <= base + per * length


@settings(max_examples=200)
@given(_texts, st.booleans())
def test_a_str_weighs_no_more_than_its_length_tells(text: str, cached: bool) -> None:
    # The bound the channel takes a str's weight under, held to sys.getsizeof for
    # every kind of character, with and without the copies CPython may keep.
    text = "".join([text, ""])  # a str of its own, unless it is the empty one
    if cached and text:  # (the shared empty str is left alone)
        _cache_other_forms(text)
    base, per = _channel._STR_SHAPE  # pyright: ignore[reportPrivateUsage] - the bound is internal
    assert sys.getsizeof(text) <= base + per * len(text)


@given(st.integers(0, 20_000))
def test_bytes_and_tuples_weigh_what_their_length_tells(length: int) -> None:
    base, per = _channel._BYTES_SHAPE  # pyright: ignore[reportPrivateUsage] - the bound is internal
    assert sys.getsizeof(bytes(length)) == base + per * length
    base, per = _channel._TUPLE_SHAPE  # pyright: ignore[reportPrivateUsage] - the bound is internal
    assert sys.getsizeof((0,) * length) == base + per * length


def _around(longest: int) -> list[int]:
    """Lengths just under, at and just over ``longest``, and well over it."""
    return [n for n in (longest - 1, longest, longest + 1, 2 * longest + 1) if n >= 0]


def _sized_edges(small: int) -> list[object]:
    """``str``, ``bytes`` and ``tuple`` values around the longest a channel takes
    for light by their length, and subclasses of each."""
    channel: Channel[object] = Channel(1000, max_bytes=small * 1000)
    edges: list[object] = [_Str("s"), _Bytes(b"b"), _Tuple((1,)), b"", (), ""]
    for n in _around(channel._longest_str):  # pyright: ignore[reportPrivateUsage] - the bound is internal
        edges += ["\xe9" * n, "\U0001f600" * n]
    for n in _around(channel._longest_bytes):  # pyright: ignore[reportPrivateUsage] - the bound is internal
        edges.append(bytes(n))
    for n in _around(channel._longest_tuple):  # pyright: ignore[reportPrivateUsage] - the bound is internal
        edges.append((0,) * n)
    return edges


def _empty_of(value: object) -> object:
    """An empty ``str``, ``bytes`` or ``tuple`` for one of those (a subclass's too);
    anything else as it is."""
    if isinstance(value, str | bytes):
        return value[:0]
    if isinstance(value, tuple):
        return ()
    return value


@pytest.mark.timeout(30)
@pytest.mark.parametrize("small", [16, 34, 35, 41, 48, 49, 90, 102, 113, 1 << 10, 8 << 10])
@pytest.mark.parametrize("numbered", [True, False])
def test_sized_values_at_the_edges_weigh_what_getsizeof_says(small: int, numbered: bool) -> None:
    # Each value alone, in a batch of its own type and kind and in a mixed one,
    # through _weigh, _weigh_one and pour (which keeps the last heavy type).
    def batches(v: object) -> list[list[object]]:
        return [[v], [v, _empty_of(v)], [v, 0], [None, v], [v, {"a": 1}]]

    edges = _sized_edges(small)
    stream = [{"a": 1}, *edges, {"b": 2}, 1.5, *edges, 7, _Str("t")]
    _weighed_as_getsizeof_says(small, numbered, edges, batches, stream)


@pytest.mark.timeout(30)
def test_a_value_of_an_unhashable_type_is_weighed_like_any_other() -> None:
    # Its type cannot go into a set or be looked up in one: it is weighed, and
    # the channel goes on.
    odd = _OddValue()
    channel: Channel[object] = Channel(100, max_bytes=100 << 20, numbered=True)
    channel.put_many([odd, 1])
    channel.put_solo(odd)
    channel.pour([odd, 2.0], Window(100), 8)
    envelopes: Channel[object] = Channel(100, max_bytes=100 << 20)
    envelopes.put_many([(0, odd), (1, 1)])
    assert _counted(channel) == 3 * sys.getsizeof(odd)
    assert _counted(envelopes) == sys.getsizeof(odd)
    assert len(channel.get_many(10)) == 5
    assert envelopes.get_many(10) == [(0, odd), (1, 1)]
    assert _counted(channel) == _counted(envelopes) == 0


class _LookAlike(type):
    """A metaclass whose classes are equal to, and hash like, the type they name as
    ``like``: a set of types takes one of them for that type."""

    def __eq__(cls, other: object) -> bool:
        return other is cls or other is vars(cls).get("like")

    def __hash__(cls) -> int:
        like = vars(cls).get("like")
        return hash(like) if like is not None else id(cls)


class _Heavy(metaclass=_LookAlike):
    def __sizeof__(self) -> int:
        return 4096


class _LikeStr(_Heavy):
    like = str

    def __len__(self) -> int:
        return 0


class _LikeStrWithoutLength(_Heavy):
    like = str


class _LikeInt(_Heavy):  # (not ordered: min() and max() of ints and these raise)
    like = int


class _LikeIntOutOfOrder(_Heavy):  # (its order raises something else)
    like = int

    def __lt__(self, other: object) -> bool:
        raise ValueError("no order")

    def __gt__(self, other: object) -> bool:
        raise ValueError("no order")


@pytest.mark.timeout(30)
# (A look-alike of a float, complex, bool or None, or of an int that orders like
# one, would be taken for one: contrived, and left for the cost of testing every
# value's type.)
@pytest.mark.parametrize("fake", [_LikeStr, _LikeStrWithoutLength, _LikeInt, _LikeIntOutOfOrder])
@pytest.mark.parametrize("numbered", [True, False])
def test_a_type_equal_to_a_builtin_one_is_weighed_like_any_other(
    fake: type[_Heavy], numbered: bool
) -> None:
    # A look-alike of str among a batch's values is weighed, its length never asked
    # for; one of int that does not order like an int is weighed too.
    real = {str: "s", int: 7}[cast("type", vars(fake)["like"])]
    values: list[object] = [real, fake(), real]
    channel: Channel[object] = Channel(100, max_bytes=100 << 10, numbered=numbered)
    batch: list[object] = values if numbered else list(enumerate(values))
    assert channel._weigh(batch) == _weight_of(values, 1 << 10)  # pyright: ignore[reportPrivateUsage] - the weighing is internal
    channel.put_many(batch)
    assert _counted(channel) == _weight_of(values, 1 << 10) > 4096
    assert len(channel.get_many(10)) == 3
    assert _counted(channel) == 0
    if numbered:
        channel.pour(values, Window(100), 8)
        assert _counted(channel) == _weight_of(values, 1 << 10)


#: Values by name, and what sys.getsizeof says they weigh: under a budget whose
#: smallest counted weight is 128 bytes the first of each pair counts for
#: nothing, and its type tells so (an int by its magnitude, a str, bytes or tuple
#: by its length), the second counts.
_KINDS: dict[str, object] = {
    "int": 7,  # 28
    "big int": 10**400,  # 204
    "bytes": b"x",  # 34
    "blob": bytes(500),  # 533
    "text": "yy",  # 51
    "long text": "y" * 200,  # 249
    "tuple": (1, 2),  # 56
    "long tuple": (0,) * 20,  # 200
}


@settings(max_examples=100)
@given(
    st.booleans(),
    st.lists(
        st.one_of(
            st.tuples(
                st.just("put"),
                st.lists(st.sampled_from(sorted(_KINDS)), max_size=5),
            ),
            st.tuples(st.just("put one"), st.sampled_from(sorted(_KINDS))),
            st.tuples(st.just("take"), st.integers(1, 6)),
        ),
        max_size=40,
    ),
)
def test_a_channel_s_byte_count_is_what_it_holds(
    numbered: bool, ops: list[tuple[str, object]]
) -> None:
    # Values of 128 bytes and more count (see _KINDS): whatever the order of puts
    # and takes, the bytes the channel counts are those of the values it holds --
    # a take weighs only while something held counts, numbers are weighed by
    # their type and magnitude, text, bytes and tuples by their length where it
    # tells.
    make = _KINDS
    # (Room for all of 40 steps' values: a put_solo into a full channel would wait.)
    channel: Channel[object] = Channel(2000, max_bytes=256_000, numbered=numbered)
    held: list[object] = []
    for op, arg in ops:
        if op == "take":
            if held:
                taken = cast("list[tuple[int, object]]", channel.get_many(cast("int", arg)))
                assert [value for _, value in taken] == held[: len(taken)]
                del held[: len(taken)]
        else:
            values = [make[k] for k in cast("list[str]", arg if op == "put" else [arg])]
            batch: list[object] = (
                values if numbered else [(channel.poured + i, v) for i, v in enumerate(values)]
            )
            if op == "put one" and numbered:
                channel.put_solo(batch[0])
                held += values
            elif batch and channel.offer(batch):  # (a full channel takes nothing)
                held += values
        assert _counted(channel) == _weight_of(held, 128)


def test_a_chunk_of_the_input_counts_what_it_weighs() -> None:
    channel: Channel[object] = Channel(1000, max_bytes=1 << 20, numbered=True)
    chunk: list[object] = [bytes(10 << 10)] * 4  # under an eighth of the budget: in whole
    channel.put_values(chunk)
    assert _counted(channel) == _weight_of(chunk, (1 << 20) // 1000)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["put_many", "aput_many"])
def test_a_put_that_waited_for_room_counts_its_batch(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The channel is full by count; the put's waiter, just before it waits, takes
    # an item itself (which wakes it): the put then goes in by its waiting path.
    channel: Channel[object] = Channel(2, max_bytes=1 << 20)
    channel.put_many([(0, b"a"), (1, b"b")])
    waits: list[str] = []

    class ThreadWaiter(_channel._ThreadWaiter):  # pyright: ignore[reportPrivateUsage] - the waiters are internal
        __slots__ = ()

        def wait(self, timeout: float | None = None) -> bool:
            waits.append("thread")
            channel.get_many(1)
            return super().wait(timeout)

    class TaskWaiter(_channel._TaskWaiter):  # pyright: ignore[reportPrivateUsage] - the waiters are internal
        __slots__ = ()

        async def wait(self) -> None:
            waits.append("task")
            channel.get_many(1)
            await super().wait()

    monkeypatch.setattr(_channel, "_ThreadWaiter", ThreadWaiter)
    monkeypatch.setattr(_channel, "_TaskWaiter", TaskWaiter)
    blob = bytes(600 << 10)
    if how == "put_many":
        channel.put_many([(2, blob)])
    else:
        asyncio.run(channel.aput_many([(2, blob)]))
    assert waits == ["thread" if how == "put_many" else "task"]
    assert _counted(channel) == sys.getsizeof(blob)


def test_without_a_byte_budget_only_the_count_bounds_a_channel() -> None:
    channel: Channel[tuple[int, bytes]] = Channel(2)
    channel.put_many([(0, bytes(8 << 20))])
    assert channel._has_room()  # pyright: ignore[reportPrivateUsage] - the budget is internal


@pytest.mark.parametrize("method", ["put", "put_solo"])
def test_put_one_item_is_weighed_and_waits_like_put_many(method: str) -> None:
    channel: Channel[tuple[int, bytes]] = Channel(2, max_bytes=1 << 20)
    put: Callable[[tuple[int, bytes]], None] = getattr(channel, method)
    put((0, bytes(700 << 10)))
    assert channel._has_room()  # pyright: ignore[reportPrivateUsage] - the budget is internal
    put((1, bytes(700 << 10)))  # over the byte budget now
    assert not channel._has_room()  # pyright: ignore[reportPrivateUsage] - the budget is internal
    blocked = threading.Thread(target=put, args=((2, b"z"),))
    blocked.start()
    assert [key for key, _ in channel.get_many(1)] == [0]
    blocked.join()
    assert [key for key, _ in channel.get_many(10)] == [1, 2]
    channel.producer_done()
    with pytest.raises(ChannelClosed):
        channel.put((3, b""))


def test_offer_puts_only_when_there_is_room_and_fails_like_a_put() -> None:
    channel: Channel[int] = Channel(2)
    assert channel.offer([1, 2])  # admitted whole while there is room
    assert not channel.offer([3])  # full: nothing put, nothing waited for
    assert channel.get_many(10) == [1, 2]
    assert channel.offer([3])
    channel.producer_done()
    with pytest.raises(ChannelClosed):
        channel.offer([4])
    aborted: Channel[int] = Channel(2)
    aborted.abort()
    with pytest.raises(ChannelAborted):
        aborted.offer([1])


def test_offer_values_puts_a_whole_chunk_or_none_of_it_and_never_waits() -> None:
    channel: Channel[tuple[Key, object]] = Channel(3, max_bytes=1 << 20, numbered=True)
    assert not channel.offer_values(list("abcd"))  # more than the capacity: nothing put
    assert len(channel) == 0
    assert channel.offer_values(list("abc"))
    assert not channel.offer_values(["d"])  # full
    assert channel.get_many(10) == list(enumerate("abc"))
    assert not channel.offer_values([bytes(2 << 20)])  # over the byte budget
    assert len(channel) == 0
    assert channel.offer_values(["d"])
    channel.producer_done()
    with pytest.raises(ChannelClosed):
        channel.offer_values(["e"])
    assert channel.get_many(10) == [(3, "d")]


def test_a_window_takes_places_now_only_if_all_of_them_are_free() -> None:
    window = Window(3)
    assert window.take_now(2)
    assert not window.take_now(2)  # one place free: none taken
    assert len(window) == 2
    assert window.take_now(1)
    window.abort()
    with pytest.raises(ChannelAborted):
        window.take_now(0)


def test_a_task_worker_s_emit_waits_only_when_the_next_stage_is_full() -> None:
    from typeflow._runtime._run import _Emitter  # pyright: ignore[reportPrivateUsage] - the worker-facing emitter

    outbox: Channel[tuple[Key, int, object]] = Channel(10)
    inbox: Channel[tuple[Key, object]] = Channel(1)
    emitter = _Emitter(inbox, outbox)
    assert emitter.offer(Outcome(keys=range(0, 1), values=["a"])) is None  # room: done
    rest = emitter.offer(Outcome(keys=range(1, 2), values=["b"]))
    assert rest is not None  # the next stage is full: the wait is left to the caller

    async def finish() -> None:
        waiting = asyncio.ensure_future(rest)
        await asyncio.sleep(0)
        assert not waiting.done()
        assert inbox.get_many(10) == [(0, "a")]
        await waiting

    asyncio.run(finish())
    assert inbox.get_many(10) == [(1, "b")]


def test_pour_puts_every_item_with_a_place_in_the_window_and_counts_them() -> None:
    channel: Channel[tuple[Key, object]] = Channel(100, numbered=True)
    window = Window(10)
    channel.pour("abcdef", window, 4)
    assert channel.get_many(100) == list(enumerate("abcdef"))
    assert channel.poured == 6
    assert len(window) == 8  # two chunks of 4 places taken for 6 items
    channel.producer_done()  # a drain: the next item is not let in, nor counted
    with pytest.raises(ChannelClosed):
        channel.pour("g", window, 4)
    assert channel.poured == 6


def test_a_sized_channel_counts_a_get_s_limit_in_what_its_items_stand_for() -> None:
    # The caller's outbox: an entry may carry one result or a batch of them.
    channel: Channel[list[int]] = Channel(10, size_of=len)
    channel.put_many([[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]])
    assert channel.get_many(4) == [[1, 2, 3], [4]]  # 4 results reached
    assert channel.get_many(1) == [[5, 6]]  # at least one entry, however big
    assert channel.get_many(100) == [[7, 8, 9, 10]]


def test_a_window_hands_out_as_many_places_as_are_free() -> None:
    window = Window(5)
    assert window.take_up_to(3) == 3
    assert window.take_up_to(3) == 2
    window.give_back(4)
    assert window.take_up_to(64) == 4
    assert len(window) == 5


@pytest.mark.timeout(30)
def test_a_full_window_waits_until_places_are_given_back_or_it_is_aborted() -> None:
    window = Window(2)
    window.take_up_to(2)
    got: list[int] = []
    taker = threading.Thread(target=lambda: got.append(window.take_up_to(8)))
    taker.start()
    window.give_back(1)  # wakes the taker whether it waits already or not
    taker.join(10)
    assert got == [1]

    async def take_one() -> None:
        await window.atake()

    failed: list[BaseException] = []

    def wait_async() -> None:
        try:
            asyncio.run(take_one())
        except ChannelAborted as exc:
            failed.append(exc)

    waiter = threading.Thread(target=wait_async)
    waiter.start()
    window.abort()
    waiter.join(10)
    assert len(failed) == 1
    with pytest.raises(ChannelAborted):
        window.take_up_to(1)


def _take_all(channel: Channel[int], got: list[int]) -> None:
    try:
        while True:
            got.extend(channel.get_many(7, share=3))
    except EndOfChannel:
        pass


def test_a_sole_producer_without_the_lock_loses_no_item_and_wakes_every_consumer() -> None:
    # put_solo appends without the lock; consumers register, then look again.
    # A tiny switch interval makes the threads interleave between any two bytecodes.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        channel: Channel[int] = Channel(5)
        got: list[list[int]] = [[], [], []]
        consumers = [threading.Thread(target=_take_all, args=(channel, g)) for g in got]
        for consumer in consumers:
            consumer.start()
        for i in range(20_000):
            channel.put_solo(i)
            if i % 97 == 0:
                os.sched_yield()  # let the consumers run dry and wait
        channel.producer_done()
        for consumer in consumers:
            consumer.join()
    finally:
        sys.setswitchinterval(previous)
    assert sorted(itertools.chain.from_iterable(got)) == list(range(20_000))


def test_a_put_between_a_consumers_look_and_its_sleep_is_not_missed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The one interleaving that could lose a wake-up, made certain: the sole
    # producer's put lands after the consumer found the channel empty and before
    # it registered as waiting, so the put sees nobody to wake.
    # The consumer must take the item without going to sleep at all.
    channel: Channel[int] = Channel(5)
    slept: list[str] = []

    class LateWaiter(_channel._ThreadWaiter):  # pyright: ignore[reportPrivateUsage] - the race under test
        def __init__(self) -> None:
            super().__init__()
            channel.put_solo(7)

        def wait(self, timeout: float | None = None) -> bool:
            slept.append("thread")
            return False  # as if the deadline had passed: get_many looks once more

    monkeypatch.setattr(_channel, "_ThreadWaiter", LateWaiter)
    assert channel.get_many(10) == [7]

    class LateTaskWaiter(_channel._TaskWaiter):  # pyright: ignore[reportPrivateUsage] - the race under test
        def __init__(self) -> None:
            super().__init__()
            channel.put_solo(8)

        async def wait(self) -> None:
            slept.append("task")

    monkeypatch.setattr(_channel, "_TaskWaiter", LateTaskWaiter)
    assert asyncio.run(channel.aget_many(10)) == [8]
    assert slept == []


def test_a_sole_producer_wakes_a_waiting_task() -> None:
    channel: Channel[int] = Channel(3)

    async def consume() -> list[int]:
        got: list[int] = []
        with contextlib.suppress(EndOfChannel):
            while True:
                got.extend(await channel.aget_many(10))
        return got

    def produce() -> None:
        for i in range(2_000):
            channel.put_solo(i)  # blocks (the locked path) while the channel is full
        channel.producer_done()

    producer = threading.Thread(target=produce)
    producer.start()
    assert asyncio.run(consume()) == list(range(2_000))
    producer.join()


def test_a_sole_producer_learns_of_a_drain_and_keeps_the_item() -> None:
    channel: Channel[int] = Channel(3)
    channel.put_solo(0)
    channel.producer_done()  # a drain: the input is closed while items wait
    with pytest.raises(ChannelClosed):
        channel.put_solo(1)
    assert channel.get_many(10) == [0]
    aborted: Channel[int] = Channel(3)
    aborted.abort()
    with pytest.raises(ChannelAborted):
        aborted.put_solo(0)


# -- shipping stages to worker processes ----------------------------------------

SHIP_BY_NAME = """
import operator, os, sys
from typeflow import stage

# Functions of importable modules travel by name, with plain pickle: such a
# run never imports cloudpickle (a good part of a short run's start-up).
pipeline = stage(backend="process")(abs) | stage(backend="process", workers=2)(operator.neg)
assert [r.unwrap() for r in pipeline.run([-1, 2])] == [-1, -2]
assert "cloudpickle" not in sys.modules, "cloudpickle was imported for by-name stages"
# Forked workers talk over a plain socket pair and are joined on their sentinel:
# multiprocessing.connection (and the tempfile, shutil, ... it imports) is not needed.
if sys.platform == "linux" and not os.environ.get("TYPEFLOW_START_METHOD"):
    assert "multiprocessing.connection" not in sys.modules, "forked workers need no Connection"
"""


def test_importable_functions_ship_by_name_without_cloudpickle_or_connections() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", SHIP_BY_NAME], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_lambdas_and_closures_still_ship_by_value() -> None:
    offset = 10
    shift: Callable[[int], int] = lambda x: x + offset  # noqa: E731 - a lambda on purpose
    shifted = stage(backend="process")(shift)
    assert [r.unwrap() for r in shifted.run([1, 2])] == [11, 12]

    def closure(x: int) -> int:
        return x * offset

    assert [r.unwrap() for r in stage(backend="process")(closure).run([3])] == [30]


def _exit_at_once() -> None:
    pass


def test_a_worker_process_asked_about_by_several_threads_at_once_is_reaped_once() -> None:
    # The pump, the thread closing the run and multiprocessing's own clean-up poll a
    # worker from different threads: the waitpid of one failed with ECHILD in the
    # others, which took the ended worker for alive (a false warning, a SIGKILL to
    # a pid already reaped).
    import multiprocessing
    import select
    from multiprocessing.process import BaseProcess

    from typeflow._backends._process import reaped_once

    ctx = multiprocessing.get_context("fork")
    for _ in range(20):
        proc = ctx.Process(target=_exit_at_once, daemon=True)
        proc.start()
        reaped_once(proc)
        poller = select.poll()
        poller.register(proc.sentinel, select.POLLIN)
        assert poller.poll(10_000)  # ended, not reaped yet
        gate = threading.Barrier(8)
        alive: list[bool] = []

        def ask(
            p: BaseProcess = proc, g: threading.Barrier = gate, seen: list[bool] = alive
        ) -> None:
            g.wait(10)
            seen.append(p.is_alive())

        askers = [threading.Thread(target=ask) for _ in range(8)]
        for t in askers:
            t.start()
        for t in askers:
            t.join(10)
        assert alive == [False] * 8
        assert proc.exitcode == 0
