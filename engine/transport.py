"""How HTTP workers and engine processes talk: one Unix-socket connection per
(worker, engine) pair for small control messages, and two shared-memory
rings per connection for the arrays (audio in, frames out), so no array is
pickled or copied through the socket on the hot path.

Each ring is written only by one side (its owner) and read only by the
other. The owner places arrays one after another (wrapping at the end) and
names them in the message header by offset, dtype and shape; the reader
copies them out as it reads the message, in order, and reports how far it
has read in the ``ack`` of every message it sends back, which frees that
part of the ring. An array that does not fit (ring full, or larger than the
ring) travels inline after the header instead: slower, never wrong.

A message on the socket: 4-byte header length, 4-byte inline length (both
little-endian), the header as JSON, the inline bytes.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import struct
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import ujson

from a2e.errors import A2EError

RING_BYTES = 32 * 2**20  # per direction and connection: 200 s of 16 kHz float32 audio
_ALIGN = 64
_PREFIX = struct.Struct("<II")
MAX_HEADER_BYTES = 1 << 20


class TransportError(A2EError):
    """The other side went away or spoke nonsense."""


class Ring:
    """One direction's shared memory: written by its owner, read by the peer."""

    def __init__(self, shm: shared_memory.SharedMemory, owner: bool) -> None:
        self.shm = shm
        self.owner = owner
        self.size = shm.size
        self.head = 0  # virtual offset of the next write (owner)
        self.tail = 0  # virtual offset up to which the peer has read (owner)

    @classmethod
    def create(cls, size: int = RING_BYTES) -> "Ring":
        return cls(shared_memory.SharedMemory(name=f"a2e-{secrets.token_hex(6)}", create=True, size=size), True)

    @classmethod
    def attach(cls, name: str) -> "Ring":
        # Workers and engines are spawned by one main process and share its
        # resource tracker, which therefore holds one entry per ring: the
        # owner's unlink removes it, and if the owner dies first the tracker
        # unlinks the ring when the main process ends.
        return cls(shared_memory.SharedMemory(name=name), False)

    @property
    def name(self) -> str:
        return self.shm.name

    def put(self, array: np.ndarray) -> list | None:
        """Place ``array``; its descriptor, or None when it does not fit now."""
        n = array.nbytes
        padded = -(-n // _ALIGN) * _ALIGN
        if padded > self.size:
            return None
        start = self.head
        if start % self.size + padded > self.size:  # no room before the end: wrap
            start += self.size - start % self.size
        if start + padded - self.tail > self.size:
            return None
        offset = start % self.size
        if n:  # (an empty array, e.g. a chunk that completed no frame, has no bytes to place)
            self.shm.buf[offset : offset + n] = memoryview(np.ascontiguousarray(array)).cast("B")
        self.head = start + padded
        return [offset, array.dtype.str, list(array.shape), self.head]

    def release(self, upto: int) -> None:
        self.tail = max(self.tail, upto)

    def get(self, desc: list) -> tuple[np.ndarray, int]:
        """Copy out the array a descriptor names; returns it and how far the ring is read."""
        offset, dtype, shape, end = desc
        count = math.prod(shape)
        if not count:
            return np.empty(shape, dtype=np.dtype(dtype)), end
        view = np.frombuffer(self.shm.buf, dtype=np.dtype(dtype), count=count, offset=offset)
        return view.reshape(shape).copy(), end

    def close(self) -> None:
        try:
            self.shm.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with the process
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


class Channel:
    """Messages with arrays over one connection (one side of it)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, out: Ring, into: Ring) -> None:
        self.reader = reader
        self.writer = writer
        self.out = out  # ours: we write, the peer reads
        self.into = into  # the peer's: it writes, we read
        self.read_upto = 0
        # Messages of one event-loop turn (an engine answers a whole batch in
        # one) go to the socket together, in one write: a system call per
        # message cost more than everything else in answering it.
        self._pending: list[bytes] = []

    def send_nowait(self, header: dict[str, Any], arrays: tuple[np.ndarray, ...] | list[np.ndarray] = ()) -> None:
        """Queue one message, written at the end of this event-loop turn.
        Arrays are placed and the message queued in one step with no await
        between, so the peer reads messages in ring order, and its acks free
        the ring in that order."""
        if self.writer.is_closing():
            raise TransportError("connection closed")
        descs, inline = [], []
        for array in arrays:
            array = np.ascontiguousarray(array)
            desc = self.out.put(array)
            if desc is None:
                desc = ["inline", array.dtype.str, list(array.shape), array.nbytes]
                inline.append(array.tobytes())  # a copy, as the caller may reuse the array before the write
            descs.append(desc)
        header["ack"] = self.read_upto
        if descs:
            header["arrays"] = descs
        head = ujson.dumps(header).encode()
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(_PREFIX.pack(len(head), sum(len(b) for b in inline)) + head)
        self._pending.extend(inline)

    def _flush(self) -> None:
        data, self._pending = self._pending, []
        if data and not self.writer.is_closing():  # (closed meanwhile: whoever waits learns it from the reader)
            self.writer.write(b"".join(data))

    async def send(self, header: dict[str, Any], arrays: tuple[np.ndarray, ...] | list[np.ndarray] = ()) -> None:
        """Write one message (and what is queued before it) now, then wait
        while the socket's buffer is full."""
        self.send_nowait(header, arrays)
        self._flush()
        await self.writer.drain()

    async def recv(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        try:
            prefix = await self.reader.readexactly(_PREFIX.size)
            head_len, inline_len = _PREFIX.unpack(prefix)
            if head_len > MAX_HEADER_BYTES:
                raise TransportError(f"message header of {head_len} bytes")
            header = ujson.loads(await self.reader.readexactly(head_len))
            inline = await self.reader.readexactly(inline_len) if inline_len else b""
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise TransportError("connection closed") from exc
        self.out.release(header.get("ack", 0))
        arrays, pos = [], 0
        for desc in header.pop("arrays", ()):
            if desc[0] == "inline":
                _, dtype, shape, nbytes = desc
                arrays.append(np.frombuffer(inline[pos : pos + nbytes], dtype=np.dtype(dtype)).reshape(shape).copy())
                pos += nbytes
            else:
                array, end = self.into.get(desc)
                self.read_upto = max(self.read_upto, end)
                arrays.append(array)
        return header, arrays

    def close(self) -> None:
        self._flush()
        self.writer.close()
        self.out.close()
        self.into.close()


async def open_channel(path: str, hello: dict[str, Any], ring_bytes: int = RING_BYTES) -> tuple[Channel, dict[str, Any]]:
    """Client side: connect, exchange ring names with the engine's greeting."""
    reader, writer = await asyncio.open_unix_connection(path)
    out = Ring.create(ring_bytes)
    try:
        writer.write(_frame({**hello, "ring": out.name}))
        await writer.drain()
        reply = await _read_frame(reader)
        if not reply.get("ok", False):
            raise TransportError(reply.get("message", "engine refused the connection"))
        into = Ring.attach(reply["ring"])
    except BaseException:
        writer.close()
        out.close()
        raise
    return Channel(reader, writer, out, into), reply


async def accept_channel(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, greeting: dict[str, Any], ring_bytes: int = RING_BYTES
) -> tuple[Channel, dict[str, Any]]:
    """Engine side: read the worker's hello, answer with our ring."""
    hello = await _read_frame(reader)
    into = Ring.attach(hello["ring"])
    out = Ring.create(ring_bytes)
    writer.write(_frame({**greeting, "ok": True, "ring": out.name}))
    await writer.drain()
    return Channel(reader, writer, out, into), hello


def _frame(header: dict[str, Any]) -> bytes:
    head = ujson.dumps(header).encode()
    return _PREFIX.pack(len(head), 0) + head


async def _read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    try:
        head_len, _ = _PREFIX.unpack(await reader.readexactly(_PREFIX.size))
        return ujson.loads(await reader.readexactly(head_len))
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise TransportError("connection closed during the greeting") from exc
