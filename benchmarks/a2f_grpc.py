"""Audio2Face-3D gRPC streams (``ProcessAudioStream``) against REST chunks, in one run.

    python benchmarks/a2f_grpc.py --sessions 50 100 200 300 [--packet-ms 100] [--seconds 8]

Starts the server (a2e-lite, ``--server-args`` for more flags) and, per level,
N gRPC streams that each send a header, then ``--packet-ms`` packets of
16 kHz 16-bit speech at real-time pace for ``--seconds``, then end of audio,
as a live Audio2Face-3D client would. Reported per level:

* first animation data: from the first audio sent to the first frames
  received (the issue's target: within one hop, ``--stream-hop-s``);
* answer latency: for every animation data, from when the packet that
  completed its first frame was due to when it arrived (p50, p99);
* kept real time: streams whose every answer came within two hops of its
  audio, whose frame count was exactly 30 per second of audio and which
  ended with SUCCESS;
* server CPU per second of audio (the server's process tree), and the same
  for REST sessions sending 1 s WAV chunks at the same N
  (``realtime_sessions.py``'s client), measured in the same run.

Writes benchmarks/out/a2f_grpc.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_s, machine, released_checkpoint, save, tree  # noqa: E402
from benchmarks.common import free_port, rest_comparison, speech_chunks, start_server  # noqa: E402
from server.ace_grpc import protocol as p  # noqa: E402

M = p.messages
STREAMS_PER_CHANNEL = 50  # gRPC servers allow ~100 concurrent streams per connection


class Stream:
    def __init__(self, offset: float) -> None:
        self.offset = offset
        self.latencies: list[float] = []
        self.first_frames_after: float | None = None
        self.frames = 0
        self.status = None
        self.error = None


async def one_stream(stub, s: Stream, index: int, packets: list[bytes], t0: float, period: float, hop: float) -> None:
    header = M.AudioWithEmotionStream(
        audio_stream_header=M.AudioWithEmotionStreamHeader(
            audio_header=p.audio.AudioHeader(samples_per_second=16000, bits_per_sample=16, channel_count=1),
            face_params=M.FaceParameters(integer_params={"id_idx": index % 12}),
        )
    )
    call = stub.ProcessAudioStream()
    packet = len(packets[0]) // 2

    async def send() -> None:
        await call.write(header)
        for k, data in enumerate(packets):
            delay = t0 + s.offset + k * period - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await call.write(M.AudioWithEmotionStream(audio_with_emotion=M.AudioWithEmotion(audio_buffer=data)))
        await call.write(M.AudioWithEmotionStream(end_of_audio=M.AudioWithEmotionStream.EndOfAudio()))
        await call.done_writing()

    sender = asyncio.ensure_future(send())
    try:
        async for message in call:
            part = message.WhichOneof("stream_part")
            if part == "animation_data":
                now = time.perf_counter()
                weights = message.animation_data.skel_animation.blend_shape_weights
                if not weights:
                    continue
                first = round(weights[0].time_code * 30)
                needed = first * 16000 // 30 + 1
                due = t0 + s.offset + (-(-needed // packet) - 1) * period
                s.latencies.append(now - due)
                if s.first_frames_after is None:
                    s.first_frames_after = now - (t0 + s.offset)
                s.frames += len(weights)
            elif part == "status":
                s.status = message.status.code
        await sender
    except grpc.RpcError as exc:
        s.error = f"{exc.code().name}: {exc.details()}"
        sender.cancel()


async def grpc_level(target: str, n: int, pcm: np.ndarray, packet: int, hop: float, want_frames: int) -> dict:
    period = packet / 16000
    packets = [pcm[i : i + packet].tobytes() for i in range(0, len(pcm), packet)]
    channels = [grpc.aio.insecure_channel(target) for _ in range(-(-n // STREAMS_PER_CHANNEL))]
    stubs = [p.services.A2FControllerServiceStub(c) for c in channels]
    # Streams spread over a hop or a packet, whichever is longer, as independent clients would be.
    spread = max(hop, period)
    streams = [Stream(spread * i / n) for i in range(n)]
    t0 = time.perf_counter() + 0.5
    await asyncio.gather(
        *(one_stream(stubs[i // STREAMS_PER_CHANNEL], s, i, packets, t0, period, hop) for i, s in enumerate(streams))
    )
    for c in channels:
        await c.close()
    lat = np.array([x for s in streams for x in s.latencies])
    firsts = np.array([s.first_frames_after for s in streams if s.first_frames_after is not None])
    kept = sum(
        1 for s in streams
        if s.error is None and s.status == p.status.Status.SUCCESS and s.frames == want_frames and max(s.latencies, default=9) <= 2 * hop
    )  # fmt: skip
    return {
        "sessions": n,
        "kept_real_time": kept,
        "errors": sum(1 for s in streams if s.error or s.status != p.status.Status.SUCCESS),
        "error_kinds": dict(Counter(s.error or "no final SUCCESS" for s in streams if s.error or s.status != p.status.Status.SUCCESS)),
        "exact_frame_counts": sum(1 for s in streams if s.frames == want_frames),
        "p50": float(np.percentile(lat, 50)) if lat.size else None,
        "p99": float(np.percentile(lat, 99)) if lat.size else None,
        "first_animation_p50": float(np.percentile(firsts, 50)) if firsts.size else None,
        "first_animation_p99": float(np.percentile(firsts, 99)) if firsts.size else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--packet-ms", type=float, default=100)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--hop", type=float, default=0.5, help="the server's --stream-hop-s")
    ap.add_argument("--no-rest", action="store_true", help="skip the REST comparison")
    ap.add_argument("--server-args", default="--model a2e-lite")
    args = ap.parse_args()

    speech = np.concatenate([np.frombuffer(c[44:], dtype="<i2") for c in speech_chunks(int(args.seconds) + 1)])
    pcm = speech[: int(args.seconds * 16000)]
    want = -(-len(pcm) * 30 // 16000)
    packet = int(args.packet_ms * 16)
    grpc_port = free_port()
    extra = [*args.server_args.split(), "--grpc-port", str(grpc_port), "--stream-hop-s", str(args.hop)]
    proc, url = start_server(released_checkpoint(), 32, extra)
    target = f"127.0.0.1:{grpc_port}"
    rows = []
    try:
        for n in args.sessions:
            cpu0, mine0 = cpu_s(tree(proc.pid)), time.process_time()
            row = asyncio.run(grpc_level(target, n, pcm, packet, args.hop, want))
            cpu, mine = cpu_s(tree(proc.pid)) - cpu0, time.process_time() - mine0
            audio_s = n * len(pcm) / 16000
            row.update(transport="grpc", hop=args.hop, packet_ms=args.packet_ms,
                       server_cpu_ms_per_audio_s=round(1000 * cpu / audio_s, 3),
                       client_cpu_ms_per_audio_s=round(1000 * mine / audio_s, 3))  # fmt: skip
            rows.append(row)
            print(
                f"gRPC hop={args.hop} N={n:4d} kept={row['kept_real_time']:4d} exact={row['exact_frame_counts']:4d} "
                f"first-animation p50={row['first_animation_p50']:.3f} p99={row['first_animation_p99']:.3f} "
                f"answers p50={row['p50']:.3f} p99={row['p99']:.3f} errors={row['errors']} {row['error_kinds'] or ''} "
                f"server CPU {row['server_cpu_ms_per_audio_s']:.2f} ms per audio s (client {row['client_cpu_ms_per_audio_s']:.2f})",
                flush=True,
            )
            if not args.no_rest:
                rows.append(rest_comparison(url, proc.pid, n, args.seconds))
    finally:
        proc.terminate()
        proc.wait(20)
    save("a2f_grpc", {"machine": machine(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
