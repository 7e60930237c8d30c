"""One ``ProcessAudioStream`` call: an Audio2Face-3D client's clip in, our frames out.

In: a header (audio format, face parameters, blend-shape multipliers and
offsets, emotion settings), then 16-bit mono PCM of any chunk size (emotions
with it are ignored), then ``end_of_audio``. Out: a header (the audio format,
the 52 blend-shape names, the start time), animation data as soon as frames
are ready (their time codes in seconds from the first sample, with the audio
they cover echoed back), the end-of-processing event, and a final status
whose message lists what of the request we could not honour.

The model runs as for a WebSocket stream (``server.live_stream``: every
``--stream-hop-s`` of audio); a client sending faster than real time, as
the Audio2Face-3D sample clients do with files, is slowed by gRPC's flow
control rather than refused. Errors end the call with a status message
(code ERROR) and the matching gRPC status code.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from a2e import raw_pcm
from a2e import tuning as tuning_spec
from a2e.constants import FPS
from a2e.errors import AudioError
from batching.errors import QueueFull

from engine.protocol import ChunkResult, SessionLimitReached
from ..credentials import Caller, Unauthenticated
from ..front import Front
from ..live_stream import LiveStream, StreamError
from ..routes import session_options
from ..statuses import status_of
from . import protocol
from .guard import CALLER, peer_host

log = logging.getLogger("a2e.grpc")

MIN_RATE, MAX_RATE = 8_000, 192_000
_GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.UNAVAILABLE,  # the session was lost with its engine: a new call works
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}
# Header fields of Audio2Face-3D's emotion network: accepted, never used.
_EMOTION_FIELDS = ("emotion_post_processing_params", "emotion_params")


class CallError(Exception):
    """Ends the call with this gRPC status code."""

    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The gRPC status of a failure (None: ours, an internal error)."""
    if isinstance(exc, CallError):
        return exc.code, exc.detail
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, exc.detail
    if isinstance(exc, (QueueFull, SessionLimitReached)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {exc}"
    if isinstance(exc, StreamError):
        return _GRPC_CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.detail
    known = status_of(exc)
    if known is None:
        return None
    return _GRPC_CODES.get(known[0], grpc.StatusCode.INTERNAL), known[1]


class AudioStreamCall:
    def __init__(self, front: Front, context: grpc.aio.ServicerContext) -> None:
        self.front = front
        self.settings = front.settings
        self.context = context
        self.live: LiveStream | None = None
        self.ignored: list[str] = []
        # Raw input bytes not yet echoed, and the input sample where they start.
        self.echo = bytearray()
        self.echo_sample = 0
        self.last_message_at = time.monotonic()
        self.failure: BaseException | None = None
        self.task: asyncio.Task | None = None
        self.caller = CALLER.get() or Caller(None, peer_host(context.peer()))

    @property
    def session_id(self) -> str | None:
        return None if self.live is None else self.live.session_id

    async def run(self) -> None:
        self.task = asyncio.current_task()
        watchdog = None
        try:
            await self._start(await self._read_first())
            watchdog = asyncio.ensure_future(self._watch_idle())
            await self._read_audio()
            if await self.live.finish():
                await self._flush_echo()
                await self._finish()
        except asyncio.CancelledError:
            if self.failure is None:
                raise  # the client went away
            # else a failure elsewhere (a run, the idle watchdog) stopped the reading
        except Exception as exc:  # noqa: BLE001 - every failure is told to the client
            await self._fail(exc)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if self.live is not None:
                await self.live.close()
        if self.failure is not None:
            code, detail = grpc_status(self.failure) or (grpc.StatusCode.INTERNAL, "internal error")
            await self.context.abort(code, detail)

    # -- in ------------------------------------------------------------------------
    async def _read_first(self):
        try:
            first = await asyncio.wait_for(self.context.read(), self.settings.header_timeout_s)
        except asyncio.TimeoutError:
            raise CallError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no audio_stream_header within {self.settings.header_timeout_s:g} s"
            ) from None
        if first is grpc.aio.EOF or first.WhichOneof("stream_part") != "audio_stream_header":
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be an audio_stream_header")
        return first.audio_stream_header

    async def _read_audio(self) -> None:
        limit_s = self.front.engine.limits.max_audio_s
        while True:
            message = await self.context.read()
            self.last_message_at = time.monotonic()
            if self.failure is not None:
                return
            self.caller = self.front.credentials.recheck(self.caller)  # a revoked key ends the stream
            if message is grpc.aio.EOF:
                return  # the client closed its side without end_of_audio: the same end
            part = message.WhichOneof("stream_part")
            if part == "end_of_audio":
                return
            if part != "audio_with_emotion":
                raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected {part or 'empty message'} after the header")
            if len(message.audio_with_emotion.emotions) and "audio_with_emotion.emotions" not in self.ignored:
                self.ignored.append("audio_with_emotion.emotions")
            await self._feed(message.audio_with_emotion.audio_buffer)
            if self.live.received_seconds() > limit_s:
                raise CallError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"audio too long: the limit is {limit_s:g} s (--max-audio-s)"
                )

    async def _feed(self, data: bytes) -> None:
        """Feed in pieces of at most half the waiting limit, waiting for room
        before each: a fast sender is slowed, not refused."""
        self.echo += data
        fmt = self.live.format
        piece = max(fmt.frame_bytes, int(self.settings.stream_max_buffer_s / 2 * fmt.sample_rate) * fmt.frame_bytes)
        for at in range(0, len(data), piece):
            await self.live.wait_for_room(piece / fmt.frame_bytes / fmt.sample_rate)
            if self.live.failed:
                return
            self.live.feed(data[at : at + piece])

    async def _watch_idle(self) -> None:
        idle = self.settings.session_idle_timeout_s
        while True:
            await asyncio.sleep(min(idle, 5.0))
            if time.monotonic() - self.last_message_at > idle and not self.live.ending:
                await self._fail(CallError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no message for {idle:g} s; stream closed"))
                return

    # -- the header ---------------------------------------------------------------
    async def _start(self, header) -> None:
        if not self.front.engine.ready:
            raise CallError(grpc.StatusCode.UNAVAILABLE, f"Model not loaded: {self.front.engine.not_ready_reason}")
        self.front.check_accepting()
        fmt = self._audio_format(header)
        spec = self._tuning(header)
        ints = dict(header.face_params.integer_params)
        identity, seed, mode, loudness = session_options(self.front, {"id_idx": ints.pop("id_idx", None), "seed": ints.pop("seed", None)})
        self.ignored += [f"face_params.integer_params.{name[:64]}" for name in ints]
        opened = await self.front.until_done(
            self.front.engine.open_session(identity, seed, mode, loudness, self.caller.client, spec)
        )
        self.live = LiveStream(self.front, opened.session_id, fmt, self.settings.stream_hop_s, "grpc", self._frames, self._fail)
        answer = protocol.messages.A2F3DAnimationDataStream(
            animation_data_stream_header=protocol.messages.A2F3DAnimationDataStreamHeader(
                audio_header=header.audio_header,
                skel_animation_header=protocol.animation.SkelAnimationHeader(blend_shapes=tuning_spec.A2F_NAMES),
                start_time_code_since_epoch=time.time(),
            )
        )
        await self.context.write(answer)
        log.info(
            "Audio2Face-3D stream %s from %s: %d Hz, id_idx %d%s", opened.session_id, self.context.peer(),
            fmt.sample_rate, identity, f"; ignored: {self._ignored_text()}" if self.ignored else "",
        )  # fmt: skip

    def _ignored_text(self) -> str:
        """What was ignored, bounded (a client can send thousands of names)."""
        shown = self.ignored[: tuning_spec.MAX_REPORTED]
        more = len(self.ignored) - len(shown)
        return ", ".join(shown) + (f", ... and {more} more" if more > 0 else "")

    def _audio_format(self, header) -> raw_pcm.RawFormat:
        if not header.HasField("audio_header"):
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, "bad audio header: the stream header has no audio_header")
        a = header.audio_header
        if a.audio_format != protocol.audio.AudioHeader.AUDIO_FORMAT_PCM:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"bad audio header: audio_format {a.audio_format} (PCM only)")
        if a.channel_count != 1:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"bad audio header: {a.channel_count} channels (mono only)")
        if a.bits_per_sample != 16:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"bad audio header: {a.bits_per_sample} bits per sample (16 only)")
        if not MIN_RATE <= a.samples_per_second <= MAX_RATE:
            raise CallError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"sample rate out of range: {a.samples_per_second} Hz (accepted: {MIN_RATE} to {MAX_RATE})",
            )
        try:
            return raw_pcm.RawFormat(a.samples_per_second, "s16le", 1)
        except AudioError as exc:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"bad audio header: {exc}") from None

    def _tuning(self, header) -> dict | None:
        bs = header.blendshape_params
        spec = tuning_spec.from_a2f_header(
            dict(header.face_params.float_params),
            dict(bs.bs_weight_multipliers),
            dict(bs.bs_weight_offsets),
            bs.HasField("enable_clamping_bs_weight") and bs.enable_clamping_bs_weight,
        )
        parsed = tuning_spec.parse(spec)  # TuningError: INVALID_ARGUMENT
        self.ignored += list(parsed.ignored)
        self.ignored += [f"face_params.float_array_params.{k[:64]}" for k in header.face_params.float_array_params]
        self.ignored += [name for name in _EMOTION_FIELDS if header.HasField(name)]
        return spec if parsed.tuning is not None else None

    # -- out ---------------------------------------------------------------------------
    async def _frames(self, result: ChunkResult, first: int) -> None:
        """One ``animation_data`` message per frame, as Audio2Face-3D sends them:
        its clients count messages as frames (the sample client's --print-fps,
        the performance tool's FPS column). ``--grpc-frames-per-message`` N
        groups up to N frames in one message instead, for clients that read
        every frame of a message: each write costs the server about 0.1 ms."""
        anim, messages = protocol.animation, protocol.messages
        rate = self.live.format.sample_rate
        received = self.live.received // self.live.format.frame_bytes
        rows = result.frames.tolist()
        group = self.front.settings.grpc_frames_per_message
        for at in range(0, len(rows), group):
            weights = [
                anim.FloatArrayWithTimeCode(time_code=(first + at + i) / FPS, values=row)
                for i, row in enumerate(rows[at : at + group])
            ]
            k = first + at + len(weights) - 1  # the message's last frame
            # Frame k covers [k, k+1) / 30 s of the input audio, echoed back with it; the
            # ceiling makes the last frame (there are ceil(N / rate * 30)) cover all N samples.
            data = anim.AnimationData(
                skel_animation=anim.SkelAnimation(blend_shape_weights=weights),
                audio=self._take_echo(min(received, -(-(k + 1) * rate // FPS))),
            )
            await self.context.write(messages.A2F3DAnimationDataStream(animation_data=data))

    def _take_echo(self, end_sample: int):
        n = max(0, end_sample - self.echo_sample) * 2
        chunk = protocol.animation.AudioWithTimeCode(
            time_code=self.echo_sample / self.live.format.sample_rate, audio_buffer=bytes(self.echo[:n])
        )
        del self.echo[:n]
        self.echo_sample += n // 2
        return chunk

    async def _flush_echo(self) -> None:
        """Audio the frames did not cover, sent alone: only where resampling made
        one frame fewer than the input's length would (a sample or two)."""
        if len(self.echo) >= 2:
            data = protocol.animation.AnimationData(audio=self._take_echo(self.echo_sample + len(self.echo) // 2))
            await self.context.write(protocol.messages.A2F3DAnimationDataStream(animation_data=data))

    async def _finish(self) -> None:
        m = protocol.messages
        await self.context.write(
            m.A2F3DAnimationDataStream(event=m.Event(event_type=m.EventType.Value("END_OF_A2F_AUDIO_PROCESSING")))
        )
        text = f"success: {self.live.frames_sent} frames for {self.live.received_seconds():.3f} s of audio"
        if self.ignored:
            text += "; ignored (no counterpart in this model): " + self._ignored_text()
        await self.context.write(
            m.A2F3DAnimationDataStream(status=protocol.status.Status(code=protocol.status.Status.SUCCESS, message=text))
        )

    async def _fail(self, exc: BaseException) -> None:
        """Tell the client (once) with a status message; ``run`` then ends the call with its code."""
        if self.failure is not None:
            return
        self.failure = exc
        if self.live is not None:
            self.live.mark_failed()
        known = grpc_status(exc)
        if known is None:
            log.error("Audio2Face-3D stream %s failed", self.session_id, exc_info=exc)
            detail = "internal error; the server log has the details"
            self.failure = CallError(grpc.StatusCode.INTERNAL, detail)
        else:
            detail = known[1]
            log.info("Audio2Face-3D stream %s ended: %s %s", self.session_id or "(not started)", known[0].name, detail)
        try:
            await self.context.write(
                protocol.messages.A2F3DAnimationDataStream(
                    status=protocol.status.Status(code=protocol.status.Status.ERROR, message=detail)
                )
            )
        except Exception:  # noqa: BLE001 - the client may be gone
            pass
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()  # stop reading: the call ends with this failure

