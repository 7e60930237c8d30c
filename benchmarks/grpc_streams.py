"""The Audio2Face-3D stream client the benchmarks share (not a benchmark
itself): N ``ProcessAudioStream`` calls that each send a header, then
packets of 16-bit speech at real-time pace, then end of audio, as a live
client would, over plaintext or TLS channels; and what their answers say:
latency per animation data, first animation, exact frame counts, SUCCESS."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import grpc
import numpy as np

from server.ace_grpc import protocol as p

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


async def grpc_level(target: str, n: int, pcm: np.ndarray, packet: int, hop: float, want_frames: int,
                     credentials: grpc.ChannelCredentials | None = None) -> dict:  # fmt: skip
    """``n`` paced streams against ``target``; ``credentials``: TLS, else plaintext."""
    period = packet / 16000
    packets = [pcm[i : i + packet].tobytes() for i in range(0, len(pcm), packet)]
    def channel() -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(target) if credentials is None else grpc.aio.secure_channel(target, credentials)

    channels = [channel() for _ in range(-(-n // STREAMS_PER_CHANNEL))]
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
