"""A live audio stream feeding one engine session, whatever carries it: audio
arrives in packets of any size, the model runs once a hop of it is waiting,
and frames go back as soon as they are ready. The WebSocket stream
(``server/stream_socket.py``) and the Audio2Face-3D gRPC stream
(``server/ace_grpc/``) are thin protocol adapters over this.

The server, not the packet size, decides when the model runs: once ``hop``
seconds of new audio are waiting and the stream's previous run is done, all
waiting audio goes to the engine as one chunk (so a stream has one chunk in
flight, and a slow moment batches the audio that piled up into one run).
The frame clock (``a2e.streaming``) makes the frames independent of how the
audio was cut. The stream holds only the audio waiting for the next run;
the session's state stays in its engine.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Awaitable, Callable

import numpy as np
import soxr

from a2e import raw_pcm
from a2e.constants import FPS, SAMPLE_RATE

from . import metrics
from engine.protocol import ChunkResult
from .front import Front


class StreamError(Exception):
    """Ends a stream with a REST-style status (server/statuses.py's codes)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


# What a stream does with frames: (the engine's answer, its first frame's session index).
FrameSink = Callable[[ChunkResult, int], Awaitable[None]]
FailureSink = Callable[[Exception], Awaitable[None]]


class LiveStream:
    def __init__(
        self,
        front: Front,
        session_id: str,
        fmt: raw_pcm.RawFormat,
        hop_s: float,
        transport: str,
        on_frames: FrameSink,
        on_failure: FailureSink,
    ) -> None:
        self.front = front
        self.session_id = session_id
        self.format = fmt
        self.hop = hop_s
        self.transport = transport  # the metrics label
        self.on_frames = on_frames
        self.on_failure = on_failure
        self.resampler = (
            soxr.ResampleStream(fmt.sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
            if fmt.sample_rate != SAMPLE_RATE
            else None
        )
        # Packets are kept as bytes and decoded when the model runs: a packet
        # costs an append, whatever its size.
        self.waiting = bytearray()
        self.received = 0  # bytes received
        self.arrivals: list[tuple[int, float]] = []  # (bytes received after a packet, when it came)
        self.frames_sent = 0
        self.first_audio_at: float | None = None
        self.last_answer_at: float | None = None
        self.runner: asyncio.Task | None = None
        self.ending = False
        self.failed = False
        self._room = asyncio.Event()  # set while the waiting audio is within the limit
        self._room.set()

    # -- audio in ----------------------------------------------------------------
    def feed(self, packet: bytes) -> None:
        """Take a packet and start a run if a hop is waiting. A stream more than
        ``--stream-max-buffer-s`` behind raises StreamError(503): the sender
        outruns the model (see ``wait_for_room`` for senders that can wait)."""
        now = time.perf_counter()
        if self.first_audio_at is None:
            self.first_audio_at = now
        self.waiting += packet
        self.received += len(packet)
        self.arrivals.append((self.received, now))
        limit = self.front.settings.stream_max_buffer_s
        if self.waiting_seconds() > limit:
            self._room.clear()
            raise StreamError(
                503,
                f"falling behind: {self.waiting_seconds():.1f} s of audio are waiting for the model "
                f"(the limit is {limit:g} s); send at real-time pace, use a larger hop, or retry later",
            )
        self._check_runner()

    async def wait_for_room(self, seconds: float) -> None:
        """Wait until ``seconds`` more audio fit within the waiting limit: a
        transport with flow control (gRPC) stops reading instead of failing
        the stream."""
        while self.waiting_seconds() + seconds > self.front.settings.stream_max_buffer_s and not self.failed:
            self._room.clear()
            await self._room.wait()

    def waiting_seconds(self) -> float:
        return len(self.waiting) / self.format.frame_bytes / self.format.sample_rate

    def received_seconds(self) -> float:
        return self.received // self.format.frame_bytes / self.format.sample_rate

    def _take_waiting(self) -> np.ndarray:
        """The waiting whole frames as 16 kHz mono float32 (a split frame's bytes stay)."""
        whole = len(self.waiting) - len(self.waiting) % self.format.frame_bytes
        # One run takes at most the engine's longest chunk (auto_limits may set it below the waiting limit).
        most = int(self.front.engine.limits.max_chunk_s * self.format.sample_rate) * self.format.frame_bytes
        whole = min(whole, max(most, self.format.frame_bytes))
        samples = raw_pcm.decode(bytes(self.waiting[:whole]), self.format)
        del self.waiting[:whole]
        if self.waiting_seconds() <= self.front.settings.stream_max_buffer_s:
            self._room.set()
        mono = samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1, dtype=np.float32)
        if self.format.encoding == "f32le" and not np.isfinite(mono).all():
            raise StreamError(400, "Invalid audio: non-finite samples (NaN or infinity)")
        if self.resampler is not None:
            mono = self.resampler.resample_chunk(mono)
        return np.ascontiguousarray(mono, dtype=np.float32)

    # -- running -------------------------------------------------------------------
    def _check_runner(self) -> None:
        if self.runner is not None and self.runner.done():
            self.runner = None
        if self.runner is None and not self.failed and self.waiting_seconds() >= self.hop:
            self.runner = asyncio.ensure_future(self._run_told())

    async def _run_told(self) -> None:
        try:
            await self._run_waiting()
        except Exception as exc:  # noqa: BLE001 - a failed run ends the stream, told to the client
            self.mark_failed()
            await self.on_failure(exc)

    def mark_failed(self) -> None:
        """No more runs (and nobody waits for room): the stream is ending with a failure."""
        self.failed = True
        self._room.set()

    async def _run_waiting(self) -> None:
        """Run the waiting audio as one chunk, again while a hop's worth piled up meanwhile."""
        while self.waiting_seconds() >= self.hop or (self.ending and len(self.waiting) >= self.format.frame_bytes):
            await self._run(self._take_waiting())

    async def _run(self, audio: np.ndarray) -> None:
        if not len(audio):
            return
        result = await self.front.until_done(self.front.engine.stream_chunk(self.session_id, audio))
        metrics.STREAM_ANSWERS.labels(self.transport).inc()
        if not len(result.frames):
            return
        first = round(result.start_time * FPS)
        await self.on_frames(result, first)
        self.last_answer_at = now = time.perf_counter()
        self.frames_sent += len(result.frames)
        metrics.FIRST_FRAME_LATENCY.labels(self.transport).observe(now - self._arrival_of_frame(first))

    def _arrival_of_frame(self, frame: int) -> float:
        """When the audio that completed ``frame`` arrived (frame k needs more than k/30 s of audio)."""
        needed = (frame * self.format.sample_rate // FPS + 1) * self.format.frame_bytes
        at = bisect.bisect_left(self.arrivals, (needed, 0.0))
        at = min(at, len(self.arrivals) - 1)
        when = self.arrivals[at][1]
        del self.arrivals[:at]  # later frames need later audio
        return when

    # -- the end -------------------------------------------------------------------
    async def finish(self) -> bool:
        """The audio has ended: run what is left (the resampler's tail too).
        False when the stream failed (and was told so) on the way."""
        self.ending = True
        if self.runner is not None:
            await self.runner  # it also runs what is still waiting, now that the stream ends
            self.runner = None
        if self.failed:
            return False
        await self._run_waiting()
        if self.resampler is not None:  # the resampler's last few samples
            await self._run(self.resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        if self.frames_sent and self.first_audio_at is not None and self.last_answer_at is not None:
            seconds = self.last_answer_at - self.first_audio_at
            if seconds > 0:
                metrics.STREAM_FPS.labels(self.transport).observe(self.frames_sent / seconds)
        return True

    async def close(self, keep_session: bool = False) -> None:
        """The stream is over, however it ended: stop its run and close its
        session (``keep_session``: leave it to be resumed, or to expire)."""
        if self.runner is not None:
            self.runner.cancel()
        if keep_session:
            return
        try:
            await self.front.engine.close_session(self.session_id)
        except Exception:  # noqa: BLE001 - the engine may be gone; its sessions expire there
            pass
