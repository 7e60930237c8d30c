"""WebSocket streams (``/api/stream``) against REST chunks, in one run.

    python benchmarks/stream_socket.py --sessions 100 200 300 400 --hop 0.5 [--packet-ms 20] [--seconds 8]
    python benchmarks/stream_socket.py --sessions 100 --hop 0.1 0.25 0.5 1.0   # choosing the default hop

Starts the server (a2e-lite, ``--server-args`` for more flags) and, per level,
N streams that each send ``--packet-ms`` packets of 16 kHz s16le speech at
real-time pace for ``--seconds``, then end. Reported per level:

* first-frame latency: for every ``frames`` answer, from when the packet that
  completed its first frame was due to when the answer arrived (p50, p99);
* kept real time: streams whose every answer came within two hops of its
  audio and whose frame count was the whole clip's;
* server CPU per second of audio (the server's process tree, from /proc),
  and the same for REST sessions sending 1 s WAV chunks at the same N
  (``realtime_sessions.py``'s client), measured in the same run.

The client speaks just enough WebSocket (RFC 6455) over asyncio streams:
pre-built binary frames with a zero mask, so that on a small machine it
takes as little CPU as possible from the server it measures.
Writes benchmarks/out/stream_socket.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import struct
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_s, machine, released_checkpoint, save, tree  # noqa: E402
from benchmarks.common import rest_comparison, speech_chunks, start_server  # noqa: E402

def cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants."""
    return cpu_s(tree(pid))


def frame(payload: bytes, opcode: int) -> bytes:
    """A client frame, FIN set, masked with a zero key (so the payload goes as it is)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload


async def read_message(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    return b0 & 0x0F, await reader.readexactly(n)


class Stream:
    """One stream's connection and what it measured."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, offset: float) -> None:
        self.reader, self.writer, self.offset = reader, writer, offset
        self.latencies: list[float] = []
        self.frames = 0
        self.error = None


async def open_stream(url: str, index: int, hop: float, offset: float) -> Stream:
    u = urlparse(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /api/stream HTTP/1.1\r\nHost: {u.hostname}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    writer.write(frame(json.dumps({"type": "start", "id_idx": index % 12, "hop": hop}).encode(), 1))
    _, body = await read_message(reader)
    stream = Stream(reader, writer, offset)
    if json.loads(body).get("type") != "started":
        stream.error = "start"
    return stream


async def receive(stream: Stream, t0: float, packet: int, period: float) -> None:
    while True:
        opcode, body = await read_message(stream.reader)
        if opcode == 8:
            return
        if opcode != 1:
            continue
        m = json.loads(body)
        if m["type"] == "frames":
            now = time.perf_counter()
            needed = m["first_frame"] * 16000 // 30 + 1
            due = t0 + stream.offset + (-(-needed // packet) - 1) * period  # when the completing packet was due
            stream.latencies.append(now - due)
            stream.frames += len(m["frames"])
        elif m["type"] in ("end", "error"):
            if m["type"] == "error":
                stream.error = m["status"]
            return


async def ws_level(url: str, n: int, pcm: np.ndarray, packet: int, hop: float, want_frames: int) -> dict:
    """n streams, one clock: every tick (a packet's time) writes the packets
    that are due, so the client costs a socket write per packet, not a task
    wake-up; streams are spread over a hop, as independent clients would be."""
    period = packet / 16000
    streams = [await open_stream(url, i, hop, period * round(hop / period * i / n)) for i in range(n)]
    packets = [frame(pcm[i : i + packet].tobytes(), 2) for i in range(0, len(pcm), packet)]
    t0 = time.perf_counter() + 0.5
    receivers = [asyncio.ensure_future(receive(s, t0, packet, period)) for s in streams]
    starts = [round(s.offset / period) for s in streams]  # in ticks
    end = frame(b'{"type": "end"}', 1)
    for tick in range(len(packets) + max(starts) + 1):
        delay = t0 + tick * period - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        for s, first in zip(streams, starts):
            k = tick - first
            if 0 <= k < len(packets):
                s.writer.write(packets[k])
            elif k == len(packets):
                s.writer.write(end)
    await asyncio.wait(receivers, timeout=60)
    for s in streams:
        s.writer.close()
    lat = np.array([x for s in streams for x in s.latencies])
    kept = sum(1 for s in streams if not s.error and s.frames == want_frames and max(s.latencies, default=9) <= 2 * hop)
    return {
        "sessions": n,
        "kept_real_time": kept,
        "errors": sum(1 for s in streams if s.error),
        "p50": float(np.percentile(lat, 50)) if lat.size else None,
        "p99": float(np.percentile(lat, 99)) if lat.size else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, nargs="+", default=[100, 200, 300])
    ap.add_argument("--hop", type=float, nargs="+", default=[0.5])
    ap.add_argument("--packet-ms", type=float, default=20)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--no-rest", action="store_true", help="skip the REST comparison")
    ap.add_argument("--server-args", default="--model a2e-lite")
    args = ap.parse_args()

    speech = np.concatenate([np.frombuffer(c[44:], dtype="<i2") for c in speech_chunks(int(args.seconds) + 1)])
    pcm = speech[: int(args.seconds * 16000)]
    want = -(-len(pcm) * 30 // 16000)
    packet = int(args.packet_ms * 16)
    proc, url = start_server(released_checkpoint(), 32, args.server_args.split())
    rows = []
    try:
        for n in args.sessions:
            for hop in args.hop:
                cpu0 = cpu_seconds(proc.pid)
                row = asyncio.run(ws_level(url, n, pcm, packet, hop, want))
                cpu = cpu_seconds(proc.pid) - cpu0
                row.update(transport="websocket", hop=hop, packet_ms=args.packet_ms,
                           server_cpu_ms_per_audio_s=round(1000 * cpu / (n * len(pcm) / 16000), 3))  # fmt: skip
                rows.append(row)
                print(
                    f"websocket hop={hop:<5} N={n:4d} kept={row['kept_real_time']:4d} p50={row['p50']:.3f} "
                    f"p99={row['p99']:.3f} errors={row['errors']} server CPU {row['server_cpu_ms_per_audio_s']:.2f} ms per audio s",
                    flush=True,
                )
            if not args.no_rest:
                rows.append(rest_comparison(url, proc.pid, n, args.seconds))
    finally:
        proc.terminate()
        proc.wait(20)
    save("stream_socket", {"machine": machine(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
