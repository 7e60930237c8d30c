"""The WebSocket stream, ``/api/stream``: one connection is one streaming
session, audio in as it comes, frames out as soon as they are ready.

Protocol (text messages are JSON, audio is binary):

1. client: ``{"type": "start", ...}`` with the session options of
   ``/api/infer_stream_init`` (``id_idx``, ``seed``, ``context_mode``,
   ``loudness``), the audio format (``sample_rate`` 16000, ``encoding``
   ``s16le``|``s16be``|``f32le``, ``channels`` 1) and ``hop`` (seconds).
2. server: ``{"type": "started", "session_id", "names", "fps", "hop", ...}``.
3. client: binary messages of raw audio in that format, of any size.
4. server: ``{"type": "frames", "first_frame", "start_time", "frames":
   [{"weights", "time"}], "audio_received"}``, times in session seconds.
5. client: ``{"type": "end"}``; the server runs what is left, sends its
   frames and ``{"type": "end", "frames", "audio_seconds"}``, and closes.

Resuming (with a shared state store, ``--state redis://...``): a stream whose
connection broke (its node died) goes on from another connection, on any
node. The first message is then ``{"type": "resume", "session_id",
"frames_received", ...}`` with the start message's audio format and hop; the
server answers ``{"type": "resumed", "session_id", "frames", "audio_samples",
"audio_received", ...}``, sends again the frames from ``frames_received`` on
that were lost with the connection (those of the last answer), and the
client sends its audio again from ``audio_samples`` (16 kHz samples of
session audio applied; exact at 16 kHz). A stream that breaks without its
``end`` message keeps its session until the idle timeout, for a resume.

When the model runs is ``server.live_stream``'s business (every ``hop``
seconds of audio). At most ``--stream-max-buffer-s`` of audio may wait: a client
sending faster than the model keeps up is told (``error``, status 503) and
the stream is closed; nothing is dropped silently. Errors are sent as
``{"type": "error", "status", "detail"}`` (the REST status codes) before the
connection closes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ujson
from sanic import Blueprint
from sanic.request import Request
from websockets.exceptions import ConnectionClosed

from a2e import raw_pcm
from a2e.constants import ARKIT_NAMES, FPS, SAMPLE_RATE
from a2e.errors import AudioError

from . import forms, responses
from engine.protocol import ChunkResult
from .front import Front
from .live_stream import LiveStream, StreamError
from .routes import client_of, session_options, tuning_options
from .statuses import status_of

log = logging.getLogger("a2e.stream")

bp = Blueprint("stream_socket")

MIN_HOP_S = 0.02
# Close codes (RFC 6455): the client's fault, ours, and "try again later".
CLOSE_POLICY, CLOSE_INTERNAL, CLOSE_TRY_AGAIN = 1008, 1011, 1013


@bp.websocket("/api/stream")
async def stream(request: Request, ws: Any) -> None:
    await StreamConnection(request, ws).run()


class StreamConnection:
    def __init__(self, request: Request, ws: Any) -> None:
        self.front: Front = request.app.ctx.front
        self.settings = self.front.settings
        self.ws = ws
        self.client = client_of(request)
        self.caller = request.ctx.caller
        self.live: LiveStream | None = None
        self.ending = False
        self.vanished = False  # the connection broke without an end message
        self.last_message_at = time.monotonic()
        self.failure: Exception | None = None

    @property
    def session_id(self) -> str | None:
        return None if self.live is None else self.live.session_id

    async def run(self) -> None:
        watchdog = None
        try:
            await self._start()
            # recv() without a timeout: with one, Sanic wraps every message in
            # wait_for and a task, which cost more than the packet itself; and
            # audio packets come by a plain call where the socket allows it.
            watchdog = asyncio.ensure_future(self._watch_idle())
            if hasattr(self.ws, "binary_sink"):
                self.ws.binary_sink = self._packet
            while not self.ending:
                message = await self.ws.recv()
                self.last_message_at = time.monotonic()
                self.caller = self.front.credentials.recheck(self.caller)  # a revoked key ends the stream
                if isinstance(message, (bytes, bytearray, memoryview)):
                    self.live.feed(bytes(message))
                else:
                    self._control(message)
            if await self.live.finish():
                await self._send({"type": "end", "frames": self.live.frames_sent, "audio_seconds": self.live.received_seconds()})
                await self.ws.close(1000, "end of stream")
        except ConnectionClosed:
            # The client went away (or a failure was told and the stream closed).
            self.vanished = self.failure is None
        except Exception as exc:  # noqa: BLE001 - every failure is told to the client
            await self._tell(exc)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if self.live is not None:
                # A broken stream's session stays (until the idle timeout) where another node can resume it.
                await self.live.close(keep_session=self.vanished and self.settings.shared_state)

    def _packet(self, data: bytes) -> None:
        """An audio packet straight from the socket (see server/socket_frames.py)."""
        self.last_message_at = time.monotonic()
        try:
            self.caller = self.front.credentials.recheck(self.caller)
            self.live.feed(data)
        except Exception as exc:  # noqa: BLE001 - told from a task: this runs inside the socket's callback
            self.ws.binary_sink = None
            asyncio.ensure_future(self._tell(exc))

    async def _tell(self, exc: Exception) -> None:
        """Tell the client what stopped the stream (once), and close it."""
        if self.failure is not None or isinstance(exc, ConnectionClosed):
            return
        self.failure = exc
        if isinstance(exc, StreamError):
            await self._fail(exc.status, exc.detail)
            return
        known = status_of(exc)
        if known is None:
            log.error("WebSocket stream %s failed", self.session_id, exc_info=exc)
            await self._fail(500, "internal error; the server log has the details")
        else:
            await self._fail(known[0], known[1])

    async def _watch_idle(self) -> None:
        idle = self.settings.session_idle_timeout_s
        while True:
            await asyncio.sleep(min(idle, 5.0))
            if time.monotonic() - self.last_message_at > idle:
                await self._fail(408, f"no message for {idle:g} s (--session-idle-timeout-s); stream closed")
                return

    # -- the conversation ------------------------------------------------------
    async def _start(self) -> None:
        first = await self.ws.recv(timeout=self.settings.header_timeout_s)
        if first is None:
            raise StreamError(408, f"no start message within {self.settings.header_timeout_s:g} s")
        body = _json(first)
        kind = body.get("type", "start")
        if kind not in ("start", "resume"):
            raise StreamError(422, "the first message must be {\"type\": \"start\", ...} or {\"type\": \"resume\", ...}")
        if not self.front.engine.ready:
            raise StreamError(503, f"Model not loaded: {self.front.engine.not_ready_reason}")
        fmt, hop = self._format(body)
        if kind == "resume":
            await self._resume(body, fmt, hop)
            return
        identity, seed, mode, loudness = session_options(self.front, body)
        tuning, ignored = tuning_options(body)
        opened = await self.front.until_done(
            self.front.engine.open_session(identity, seed, mode, loudness, self.client, tuning)
        )
        self.live = LiveStream(self.front, opened.session_id, fmt, float(hop), "websocket", self._frames, self._tell)
        started = {
            "type": "started",
            "session_id": opened.session_id,
            **self._stream_fields(fmt, hop),
            "id_idx": identity,
            "seed": seed,
            "context_mode": opened.context_mode,
            "loudness": opened.loudness,
        }
        if "tuning" in body:
            started["tuning_ignored"] = list(ignored)
        await self._send(started)

    @staticmethod
    def _stream_fields(fmt: raw_pcm.RawFormat, hop: float) -> dict:
        return {"names": list(ARKIT_NAMES), "fps": float(FPS), "hop": float(hop), "sample_rate": fmt.sample_rate,
                "encoding": fmt.encoding, "channels": fmt.channels}  # fmt: skip

    async def _resume(self, body: dict, fmt: raw_pcm.RawFormat, hop: float) -> None:
        session_id = body.get("session_id")
        if not isinstance(session_id, str) or not session_id:
            raise StreamError(422, "a resume message needs the session_id of the stream's started message")
        received = forms.parse_int(body.get("frames_received"), "frames_received", 0, 0, 2**53)
        position = await self.front.until_done(self.front.engine.session_position(session_id))
        missing = position.frames - received
        kept = 0 if position.last is None else len(position.last.frames)
        if missing < 0:
            raise StreamError(409, f"frames_received={received} but the session has sent {position.frames} frames")
        if missing > kept:
            raise StreamError(409, f"frames {received} to {position.frames - 1} are no longer kept (only the last answer's "
                                   f"are): resume with frames_received of at least {position.frames - kept}")  # fmt: skip
        self.live = LiveStream(self.front, session_id, fmt, float(hop), "websocket", self._frames, self._tell)
        # Its audio so far, in the client's bytes: later frames' latency is measured against it.
        self.live.received = position.samples * fmt.sample_rate // SAMPLE_RATE * fmt.frame_bytes
        self.live.frames_sent = position.frames
        await self._send({
            "type": "resumed", "session_id": session_id, **self._stream_fields(fmt, hop), "frames": position.frames,
            "chunks": position.chunks, "audio_samples": position.samples, "audio_received": position.samples / SAMPLE_RATE,
            "context_mode": position.context_mode,
        })  # fmt: skip
        if missing:
            message = responses.stream_frames(position.last.frames[kept - missing :], received)
            message["audio_received"] = self.live.received_seconds()
            await self._send(message)

    def _format(self, body: dict) -> tuple[raw_pcm.RawFormat, float]:
        """The audio format and hop of a start or resume message."""
        try:
            fmt = raw_pcm.RawFormat(
                forms.parse_int(body.get("sample_rate"), "sample_rate", SAMPLE_RATE, 1000, 384_000),
                forms.parse_str(body.get("encoding"), "encoding", "s16le", tuple(raw_pcm.ENCODINGS)),
                forms.parse_int(body.get("channels"), "channels", 1, 1, 32),
            )
        except AudioError as exc:
            raise StreamError(422, str(exc)) from None
        hop = body.get("hop", self.settings.stream_hop_s)
        if isinstance(hop, bool) or not isinstance(hop, (int, float)):
            raise StreamError(422, f"hop must be a number of seconds, got {hop!r}")
        if not MIN_HOP_S <= hop <= self.front.engine.limits.max_chunk_s:
            raise StreamError(422, f"hop must be between {MIN_HOP_S} and {self.front.engine.limits.max_chunk_s:g} s")
        return fmt, float(hop)

    def _control(self, text: str) -> None:
        body = _json(text)
        if body.get("type") == "end":
            self.ending = True
        else:
            raise StreamError(422, f"unknown message type {body.get('type')!r}; send binary audio or {{\"type\": \"end\"}}")

    async def _frames(self, result: ChunkResult, first: int) -> None:
        message = responses.stream_frames(result.frames, first)
        message["audio_received"] = self.live.received_seconds()
        await self._send(message)

    async def _send(self, message: dict) -> None:
        await self.ws.send(ujson.dumps(message, ensure_ascii=False))

    async def _fail(self, status: int, detail: str) -> None:
        code = CLOSE_INTERNAL if status >= 500 and status != 503 else CLOSE_TRY_AGAIN if status == 503 else CLOSE_POLICY
        log.info("WebSocket stream %s closed: %d %s", self.session_id or "(not started)", status, detail)
        try:
            await self._send({"type": "error", "status": status, "detail": detail})
            await self.ws.close(code, detail[:120])
        except ConnectionClosed:
            pass


def _json(text: str | bytes) -> dict:
    try:
        body = ujson.loads(text)
    except ValueError:
        raise StreamError(422, "a text message must be a JSON object") from None
    if not isinstance(body, dict):
        raise StreamError(422, "a text message must be a JSON object")
    return body
