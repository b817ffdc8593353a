"""How batches cross a process boundary: pickle protocol 5, large buffers out of band.

A message is one frame on the worker's socket::

    [count u32][pickle length u64][count x buffer length u64][pickle][buffer]...

The pickle is protocol 5.  Buffers of :data:`OUT_OF_BAND_MIN` bytes or more
(the data of NumPy arrays, ``bytearray``s, anything that offers a
``pickle.PickleBuffer``) are not copied into the pickle: they follow it, and the
whole frame leaves in one ``sendmsg`` call straight from the objects' memory.
The receiver reads the pickle and each buffer with ``recv_into`` directly into
memory it allocates once per buffer, so a 1 MiB array is copied once by the
kernel on each side and never through Python-level chunks (which is what
``multiprocessing.Connection.recv_bytes`` does, at about a tenth of the speed).

The socket's buffers are raised to :data:`SOCKET_BUFFER` (the kernel may cap
that); :attr:`Wire.pipeline_bytes` is how big a message may be and still be
sent while the other side is busy (see the process backend).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import struct
from multiprocessing.connection import Connection
from typing import Final

__all__ = ["OUT_OF_BAND_MIN", "SOCKET_BUFFER", "Wire"]

_HEAD: Final = struct.Struct("=IQ")
#: Buffers smaller than this travel inside the pickle (a frame per buffer costs more).
OUT_OF_BAND_MIN: Final = 16 * 1024
#: The socket buffer size asked for, each way.
SOCKET_BUFFER: Final = 4 * 1024 * 1024
#: The most parts handed to one ``sendmsg`` call (below every system's IOV_MAX).
_MAX_PARTS: Final = 512


class Wire:
    """One end of a worker's socket, for framed messages.

    It shares the socket of ``conn`` (through a duplicate descriptor), so
    ``conn`` can still be handed to ``multiprocessing.connection.wait``.
    """

    __slots__ = ("_head", "_sock", "pipeline_bytes")

    def __init__(self, conn: Connection) -> None:
        self._sock = socket.socket(fileno=os.dup(conn.fileno()))
        self._head = bytearray(_HEAD.size)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
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
        sock = self._sock
        while parts:
            chunk = parts[:_MAX_PARTS]
            sent = sock.sendmsg(chunk)
            del parts[: len(chunk)]
            total = sum(memoryview(p).nbytes for p in chunk)
            if sent < total:  # interrupted or very large: finish by hand
                views = [memoryview(p).cast("B") for p in chunk]
                for view in views:
                    if sent >= view.nbytes:
                        sent -= view.nbytes
                        continue
                    sock.sendall(view[sent:])
                    sent = 0
        return size

    # -- receiving -----------------------------------------------------------

    def recv(self) -> object:
        """Receive one message.  Raises ``EOFError`` if the other side is gone."""
        head = self._head
        self._read_into(memoryview(head))
        count, length = _HEAD.unpack(head)
        if count:
            table = bytearray(8 * count)
            self._read_into(memoryview(table))
            sizes = struct.unpack(f"={count}Q", table)
        else:
            sizes = ()
        data = bytearray(length)
        self._read_into(memoryview(data))
        buffers = [bytearray(size) for size in sizes]
        for buffer in buffers:
            self._read_into(memoryview(buffer))
        return pickle.loads(data, buffers=buffers)

    def _read_into(self, view: memoryview) -> None:
        recv_into = self._sock.recv_into
        while view.nbytes:
            n = recv_into(view)
            if not n:
                raise EOFError("the other end of the worker's socket is closed")
            view = view[n:]


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
        head += struct.pack(f"={len(buffers)}Q", *sizes)
    parts: list[memoryview | bytes] = [head, data, *buffers]
    return parts, len(head) + len(data) + sum(sizes)
