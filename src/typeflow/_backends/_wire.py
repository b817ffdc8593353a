"""How batches cross a process boundary: pickle protocol 5, large buffers out of band.

A message is one frame on the worker's socket::

    [count u32][pickle length u64][count x buffer length u64][pickle][buffer]...

The pickle is protocol 5.  Buffers of :data:`OUT_OF_BAND_MIN` bytes or more
(the data of NumPy arrays, anything that offers a ``pickle.PickleBuffer``, and
items and results that are ``bytes`` or ``bytearray``, see :func:`lift`) are
not copied into the pickle: they follow it, and the whole frame leaves in one
``sendmsg`` call straight from the objects' memory.
The receiver reads whatever has arrived into a receive buffer of
:data:`RECV_BUFFER` bytes (so a small message, or two, costs one ``recv_into``
call: every blocking call gives up the GIL and may wait to get it back), and
reads the rest of a large pickle or buffer with ``recv_into`` directly into
memory it allocates once per buffer, so a 1 MiB array is copied once by the
kernel on each side and never through Python-level chunks (which is what
``multiprocessing.Connection.recv_bytes`` does, at about a tenth of the speed).
A ``bytes`` value's buffer is marked in the frame: for a few messages after
one that held such a value (and for a worker's first few messages) the
receiver reads no further than each part needs, and the next value is read
by the kernel straight into a new ``bytes`` object (``recv`` with
``MSG_WAITALL``), with no copy of its own.  A buffer
whose data was copied out (a ``bytes`` value's, when part of it came in with a
read ahead) is read into again by the next message (up to
:data:`SPARE_BYTES`): no new memory to zero and, when the allocator has given
the last one back to the system, to fault in page by page.

Each way has its own buffer size, asked for on both ends (some systems count
the receiver's).  Batches to a worker go through a small one
(:data:`BATCH_BUFFER`): a large batch then streams into the worker as it
reads, and both copies find its data still in the processor's cache (from a
buffer of megabytes the worker read it back cold, which cost the copy about
twice as much on a machine that allows such buffers).  The parent may send
a batch while the worker is busy, and wait until the worker takes it: a
worker that finds its own socket full while it sends a reply reads what
arrives meanwhile (``worker=True``), so the two never wait for each other.
Replies go through a large one (:data:`REPLY_BUFFER`) where the system allows
it, so that a worker seldom has to.  The kernel caps both (stock Linux at
about 208 KiB, ``net.core.wmem_max``); :attr:`Wire.pipeline_bytes` is how big
a message may be and still be sent at once whatever the other side does
(see the process backend, which needs that under a timeout).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Final, Protocol, SupportsIndex, TypeVar, cast

from typing_extensions import Buffer

__all__ = [
    "BATCH_BUFFER",
    "OUT_OF_BAND_MIN",
    "RECV_BUFFER",
    "REPLY_BUFFER",
    "SPARE_BYTES",
    "Endpoint",
    "Undecodable",
    "Wire",
    "encode",
    "lift",
]

_HEAD: Final = struct.Struct("=IQ")
#: Set in a buffer's length in the frame when the buffer is a ``bytes`` object's
#: data: the receiver may read it straight into a new ``bytes`` (see Wire.recv).
_BYTES_FLAG: Final = 1 << 63
_SIZE: Final = _BYTES_FLAG - 1
#: After a message with a large ``bytes`` value, how many messages are read exactly.
_EXACT_MESSAGES: Final = 4


def _references(buffers: list[bytearray]) -> list[int]:
    """``sys.getrefcount`` of each buffer, as counted from here."""
    return [sys.getrefcount(b) for b in buffers]


#: Whether ``sys.getrefcount`` tells when nothing else holds an object: CPython
#: with its GIL (a free-threaded build defers some counts; ``sys._is_gil_enabled``
#: is there from 3.13).
_COUNTS_REFERENCES: Final = sys.implementation.name == "cpython" and bool(
    getattr(sys, "_is_gil_enabled", lambda: True)()
)
#: The count of a buffer that only its list holds, measured rather than assumed
#: (the interpreter decides which of the loop's own references it counts).
_ONLY_HERE: Final = _references([bytearray(1)])[0]
#: Buffers smaller than this travel inside the pickle (a frame per buffer costs more).
OUT_OF_BAND_MIN: Final = 16 * 1024
#: The socket buffer asked for batches on their way to a worker (see above).
BATCH_BUFFER: Final = 256 * 1024
#: The socket buffer asked for replies on their way from a worker.
REPLY_BUFFER: Final = 4 * 1024 * 1024
#: The most parts handed to one ``sendmsg`` call (below every system's IOV_MAX).
_MAX_PARTS: Final = 512
#: The receive buffer: messages up to this size are read in as few calls as can be.
RECV_BUFFER: Final = 256 * 1024
#: The most bytes of a message's out-of-band buffers kept for the next message.
SPARE_BYTES: Final = 8 * 1024 * 1024


class Undecodable(Exception):
    """A whole message arrived but does not unpickle here (an exception whose
    ``__init__`` wants other arguments than its ``args``, a class this process
    cannot import...).  The stream is intact: the next message can be read."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


class Endpoint(Protocol):
    """One end of a worker's socket: a ``socket.socket`` (forked workers), or a
    ``multiprocessing.connection.Connection`` (workers started otherwise)."""

    def fileno(self) -> int: ...

    def close(self) -> None: ...


class Wire:
    """One end of a worker's socket, for framed messages.

    It shares the socket of ``conn`` (through a duplicate descriptor), so
    ``conn`` can still be waited on and closed on its own.
    """

    __slots__ = (
        "_buf",
        "_end",
        "_exact",
        "_sock",
        "_spare",
        "_start",
        "_worker",
        "pipeline_bytes",
    )

    def __init__(self, conn: Endpoint, *, worker: bool = False) -> None:
        self._sock = socket.socket(fileno=os.dup(conn.fileno()))
        #: A worker's end: a send that finds the socket full reads what arrives
        #: meanwhile (the parent may be blocked sending it).
        self._worker = worker
        #: Received bytes not yet used are ``_buf[_start:_end]``.
        self._buf = bytearray(RECV_BUFFER)
        self._start = self._end = 0
        #: The out-of-band buffers of the last message that nothing kept (their
        #: data was copied out: ``bytes`` values), for the next message to read into.
        self._spare: list[bytearray] = []
        #: How many more messages to read no further than they need (see :meth:`recv`).
        #: A worker's first messages too: its first batch's ``bytes`` then come
        #: straight into place (a read ahead would copy the first one, at the start
        #: of a run, while the new process still faults its pages in).
        self._exact = _EXACT_MESSAGES if worker else 0
        sending, receiving = (
            (REPLY_BUFFER, BATCH_BUFFER) if worker else (BATCH_BUFFER, REPLY_BUFFER)
        )
        for option, size in ((socket.SO_SNDBUF, sending), (socket.SO_RCVBUF, receiving)):
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.SOL_SOCKET, option, size)
        sndbuf = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        #: The largest message that always fits into the socket's send buffer
        #: (a quarter of it: the kernel counts its own overhead against it).
        self.pipeline_bytes = max(16 * 1024, sndbuf // 4)

    def close(self) -> None:
        self._sock.close()

    # -- sending -------------------------------------------------------------

    def send(self, obj: object) -> int:
        """Send one message; returns its size in bytes.

        Raises whatever pickling raises (nothing is sent then), or ``OSError``
        if the other side is gone.
        """
        return self.send_parts(*encode(obj))

    def send_parts(self, parts: list[memoryview | bytes], size: int) -> int:
        """Send a frame made by :func:`encode`; returns its size.  A worker's wire
        reads what arrives meanwhile whenever the socket is full."""
        sock, worker = self._sock, self._worker
        flags = socket.MSG_DONTWAIT if worker else 0
        while parts:
            left: Sequence[memoryview | bytes] = parts[:_MAX_PARTS]
            del parts[: len(left)]
            while left:
                try:
                    sent = sock.sendmsg(left, [], flags)
                except BlockingIOError:
                    sent = 0
                if sent == size:  # the whole frame at once: the common case
                    return size
                left = _unsent(left, sent)
                if left and worker:
                    self._read_until_writable()
        return size

    def _read_until_writable(self) -> None:
        """Wait until the socket takes more; read what arrives meanwhile into the
        receive buffer (the other side may be blocked sending it)."""
        poller = select.poll()
        poller.register(self._sock, select.POLLIN | select.POLLOUT)
        while True:
            for _, events in poller.poll():
                if events & select.POLLOUT:
                    return
                if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    self._read_ahead()

    def _read_ahead(self) -> None:
        """Receive what there is into the receive buffer, which grows if it is full."""
        buf = self._buf
        if self._end == len(buf):
            if self._start:  # room in front: move what is left there
                left = self._end - self._start
                buf[:left] = buf[self._start : self._end]
                self._start, self._end = 0, left
            else:
                buf.extend(bytes(len(buf)))
        with memoryview(buf) as view:
            got = self._sock.recv_into(view[self._end :])
        if not got:
            raise BrokenPipeError("the other end of the worker's socket is closed")
        self._end += got

    # -- receiving -----------------------------------------------------------

    def recv(self) -> object:
        """Receive one message.

        Raises:
            EOFError: the other side is gone.
            Undecodable: the message arrived whole but does not unpickle.
        """
        # For a few messages after one that carried a large ``bytes`` value, read
        # only what each part needs: the next such value then comes straight from
        # the socket into a new ``bytes`` object, where a read ahead would have
        # taken its first part into the receive buffer (and the value would be
        # copied out whole).  Each message costs a read more meanwhile.
        exact = self._exact > 0
        self._fill(_HEAD.size, exact=exact)
        count, length = _HEAD.unpack_from(self._buf, self._start)
        self._start += _HEAD.size
        sizes: tuple[int, ...] = ()
        if 8 * count + length <= len(self._buf):
            self._fill(8 * count + length, exact=exact)
        if count:
            sizes = struct.unpack(f"={count}Q", self._take(8 * count, exact=exact))
        data = self._take(length, exact=exact)
        copied: list[bytearray] = []  # buffers whose data went into a bytes value
        buffers: list[bytes | bytearray] = [
            self._take_bytes(size & _SIZE, copied)
            if size & _BYTES_FLAG
            else self._take_into(self._buffer(size))
            for size in sizes
        ]
        if any(size & _BYTES_FLAG for size in sizes):
            self._exact = _EXACT_MESSAGES
        elif exact:
            self._exact -= 1
        if self._start == self._end and len(self._buf) > RECV_BUFFER:
            # Grown to hold what arrived while this side was sending: used up.
            self._buf = bytearray(RECV_BUFFER)
            self._start = self._end = 0
        try:
            message = pickle.loads(data, buffers=buffers)
        except Exception as exc:
            raise Undecodable(exc) from exc
        arrays = [b for b in buffers if isinstance(b, bytearray)]  # bytes: nothing to reuse
        del buffers
        counted = arrays and _COUNTS_REFERENCES
        if counted or copied:
            # A buffer whose data was copied out (into a ``bytes`` value), and one
            # that only this list holds now (the same, through pickle's own
            # rebuild), is read into by the next message.  A fresh 1 MiB buffer
            # each time cost more than the copy: the allocator gave the memory back
            # to the system after every message, and each of its 256 pages was
            # faulted in again, zeroed, on the next.
            spare = copied
            if counted:
                counts = _references(arrays)
                spare += [b for b, n in zip(arrays, counts, strict=True) if n == _ONLY_HERE]
            while sum(map(len, spare)) > SPARE_BYTES:  # a batch of many: keep a few
                spare.pop()
            self._spare = spare
        return message

    def _buffer(self, size: int) -> bytearray:
        """A buffer of ``size`` bytes to read into: a spare one of that size, or new."""
        spare = self._spare
        for i, buffer in enumerate(spare):
            if len(buffer) == size:
                return spare.pop(i)
        return bytearray(size)

    def _take(self, n: int, *, exact: bool = False) -> bytes | bytearray:
        """The next ``n`` bytes: from the receive buffer when they fit in it."""
        if n > len(self._buf):
            return self._take_into(bytearray(n))
        self._fill(n, exact=exact)
        with memoryview(self._buf) as view:
            data = view[self._start : self._start + n].tobytes()
        self._start += n
        return data

    def has_message(self) -> bool:
        """Whether a whole message has already been received (``recv`` will not block)."""
        available = self._end - self._start
        if available < _HEAD.size:
            return False
        count: int
        length: int
        count, length = _HEAD.unpack_from(self._buf, self._start)
        if available < _HEAD.size + 8 * count:
            return False
        sizes: tuple[int, ...] = struct.unpack_from(
            f"={count}Q", self._buf, self._start + _HEAD.size
        )
        return available >= _HEAD.size + 8 * count + length + sum(n & _SIZE for n in sizes)

    def _take_bytes(self, size: int, copied: list[bytearray]) -> bytes:
        """The next ``size`` bytes as a new ``bytes``: read straight into it by the
        kernel when none of them has been received yet, else copied out of a buffer
        (added to ``copied``: free again)."""
        if self._start == self._end:
            data = self._sock.recv(size, socket.MSG_WAITALL)
            if len(data) == size:
                return data
            if not data:
                raise EOFError("the other end of the worker's socket is closed")
            # Cut short (a signal): the rest by hand, and one copy after all.
            rest = bytearray(size - len(data))
            self._read_into(memoryview(rest))
            return data + rest
        buffer = self._take_into(self._buffer(size))
        copied.append(buffer)
        return bytes(buffer)

    def _fill(self, n: int, *, exact: bool = False) -> None:
        """Make sure ``n`` (at most the buffer's size) received bytes are buffered;
        ``exact``: receive no more than that."""
        if self._end - self._start >= n:
            return
        buf = self._buf
        if self._start + n > len(buf):  # no room behind: move what is left to the front
            left = self._end - self._start
            buf[:left] = buf[self._start : self._end]
            self._start, self._end = 0, left
        recv_into = self._sock.recv_into
        with memoryview(buf) as view:
            while self._end - self._start < n:
                want = n - (self._end - self._start) if exact else 0  # 0: all there is room for
                got = recv_into(view[self._end :], want)
                if not got:
                    raise EOFError("the other end of the worker's socket is closed")
                self._end += got

    def _take_into(self, target: bytearray) -> bytearray:
        """Fill ``target`` with the next bytes: the buffered ones, then straight from the socket."""
        with memoryview(target) as view:
            have = min(self._end - self._start, len(target))
            view[:have] = self._buf[self._start : self._start + have]
            self._start += have
            self._read_into(view[have:])
        return target

    def _read_into(self, view: memoryview) -> None:
        recv_into = self._sock.recv_into
        while view.nbytes:
            n = recv_into(view)
            if not n:
                raise EOFError("the other end of the worker's socket is closed")
            view = view[n:]


def _unsent(parts: Sequence[memoryview | bytes], sent: int) -> list[memoryview]:
    """What is left of ``parts`` once their first ``sent`` bytes are sent."""
    left: list[memoryview] = []
    for part in parts:
        view = memoryview(part).cast("B")
        if sent >= view.nbytes:
            sent -= view.nbytes
            continue
        left.append(view[sent:])
        sent = 0
    return left


_Values = TypeVar("_Values", bound=Sequence[object])
_BYTES: Final = frozenset({bytes, bytearray})


class _OutOfBand:
    """A large ``bytes`` or ``bytearray`` value on its way to the other process.

    The pickle protocol copies ``bytes`` and ``bytearray`` into the stream, even
    with a ``buffer_callback`` (neither ``reducer_override`` nor a dispatch table
    is asked about them); wrapped, its data leaves out of band like an array's.
    On the other side a ``bytearray`` is the very buffer the data was read into,
    and ``bytes`` a new ``bytes`` object the data was read into (or a copy of the
    buffer, when part of the data came in with a read ahead: see Wire.recv).
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[object, tuple[object]]:
        data = self.data
        rebuild = _as_bytes if type(data) is bytes else _as_bytearray
        return rebuild, (pickle.PickleBuffer(data),)


def _as_bytes(buffer: Buffer) -> bytes:
    return bytes(buffer)


def _as_bytearray(buffer: Buffer) -> bytearray:
    return buffer if type(buffer) is bytearray else bytearray(buffer)


def lift(values: _Values) -> _Values | list[object]:
    """``values`` with every ``bytes`` or ``bytearray`` of :data:`OUT_OF_BAND_MIN`
    bytes or more wrapped to travel out of band (see :class:`_OutOfBand`).

    Only top-level values: bytes inside other objects travel in the pickle.
    ``values`` itself unless its first value is ``bytes`` or a ``bytearray``, so
    that a batch of anything else costs one test.
    """
    if not values or type(values[0]) not in _BYTES:
        return values
    lifted: list[object] = []
    for value in values:
        if type(value) in _BYTES and len(cast("bytes", value)) >= OUT_OF_BAND_MIN:
            value = _OutOfBand(cast("bytes", value))
        lifted.append(value)
    return lifted


def encode(obj: object) -> tuple[list[memoryview | bytes], int]:
    """The parts of ``obj``'s frame, and its size in bytes (pickling raises here)."""
    buffers: list[memoryview] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: let pickle copy it in-band
            return True
        if raw.nbytes < OUT_OF_BAND_MIN:
            return True
        buffers.append(raw)
        return False

    data = pickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
    sizes = [b.nbytes for b in buffers]
    head = _HEAD.pack(len(buffers), len(data))
    if buffers:
        flags = [_BYTES_FLAG if type(b.obj) is bytes and b.readonly else 0 for b in buffers]
        head += struct.pack(
            f"={len(buffers)}Q", *[n | f for n, f in zip(sizes, flags, strict=True)]
        )
    parts: list[memoryview | bytes] = [head, data, *buffers]
    return parts, len(head) + len(data) + sum(sizes)
