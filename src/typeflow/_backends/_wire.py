"""How batches cross a process boundary: pickle protocol 5, large buffers out of band.

A message is one pickle plus the out-of-band buffers it refers to (the data of
NumPy arrays, ``bytearray``s and other objects that support
``pickle.PickleBuffer``), each sent as its own frame, so that big payloads are
never copied into the pickle stream.
"""

from __future__ import annotations

import pickle
import struct
from multiprocessing.connection import Connection

__all__ = ["recv", "send"]

_HEADER = struct.Struct("!I")


def send(conn: Connection, obj: object) -> None:
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    conn.send_bytes(_HEADER.pack(len(buffers)) + data)
    for buf in buffers:
        conn.send_bytes(buf.raw())


def recv(conn: Connection) -> object:
    message = conn.recv_bytes()
    (count,) = _HEADER.unpack_from(message)
    buffers = [conn.recv_bytes() for _ in range(count)]
    return pickle.loads(memoryview(message)[_HEADER.size :], buffers=buffers)
