"""An engine process: one device's InferenceService (model, runner, batcher,
streaming sessions) behind a Unix socket that HTTP workers connect to.

Started by the supervisor (``engine.supervisor``) with its index, device and
generation (how many times this index was started before). Session ids it
makes end in ``IIGG``: its index and generation in hex, so a worker routes a
chunk from the id alone, and a chunk of a session made by an earlier
generation is answered "session lost: its engine restarted".

Requests are served concurrently; a session's chunks are applied in the
order this process reads them (each is queued on its session as it is read,
with no coroutine of its own, and answered from the batch's callback). A
``cancel`` message stops a request's work (the worker's client went away):
queued windows are dropped and the session is left as if the chunk had
never come.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import asdict, replace
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from a2e.errors import A2EError
from a2e.loudness import LoudnessMode
from batching import metrics as batch_metrics
from runtime.heap import freeze_startup_objects
from runtime.logs import configure_logging
from runtime.settings import Settings

from .protocol import ChunkResult, SessionNotFound
from .service import InferenceService, StreamChunk
from .session_ids import engine_of, session_tag
from .transport import Channel, TransportError, accept_channel

log = logging.getLogger("a2e.engine")

EXPIRY_INTERVAL_S = 5.0


def error_reply(request_id: int, exc: BaseException) -> dict[str, Any]:
    reply: dict[str, Any] = {"id": request_id, "ok": False, "error": type(exc).__name__, "message": str(exc)}
    retry = getattr(exc, "retry_after_s", None)
    if retry is not None:
        reply["retry_after"] = float(retry)
    expected = getattr(exc, "expected_chunk_index", None)
    if expected is not None:
        reply["expected_chunk_index"] = expected
    return reply


class EngineServer:
    def __init__(self, index: int, generation: int, service: InferenceService) -> None:
        self.index = index
        self.generation = generation
        self.service = service
        self.stopping = False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            channel, hello = await accept_channel(reader, writer, self.greeting())
        except (TransportError, OSError, KeyError) as exc:
            log.warning("a worker could not connect: %s", exc)
            writer.close()
            return
        tasks: dict[int, asyncio.Task] = {}
        chunks: dict[int, StreamChunk] = {}
        try:
            while True:
                header, arrays = await channel.recv()
                op = header.get("op")
                if op == "chunk":  # the hot path: no task, answered from the batch's callback
                    self.submit_chunk(channel, header, arrays, chunks)
                    continue
                if op == "cancel":
                    rid = header.get("id")
                    task = tasks.get(rid)
                    if task is not None:
                        task.cancel()
                    chunk = chunks.pop(rid, None)
                    if chunk is not None:
                        self.service.cancel_chunk(chunk)
                    continue
                if op == "ack":
                    continue
                rid = header["id"]
                task = asyncio.ensure_future(self.serve(channel, rid, op, header, arrays))
                tasks[rid] = task
                task.add_done_callback(lambda _, rid=rid: tasks.pop(rid, None))
        except TransportError:
            pass  # the worker went away: what it asked for is not wanted any more
        finally:
            for task in list(tasks.values()):
                task.cancel()
            for chunk in list(chunks.values()):
                self.service.cancel_chunk(chunk)
            channel.close()

    def submit_chunk(self, channel: Channel, h: dict, arrays: list[np.ndarray], chunks: dict[int, StreamChunk]) -> None:
        rid = h["id"]

        def reply(result: ChunkResult | BaseException) -> None:
            chunks.pop(rid, None)
            if isinstance(result, BaseException):
                self._log_failure("chunk", result)
                self._send(channel, error_reply(rid, result))
                return
            meta = {"id": rid, "ok": True, "chunk_index": result.chunk_index, "audio_seconds": result.audio_seconds,
                    "start_time": result.start_time, "context_mode": result.context_mode, "load": self.load()}  # fmt: skip
            self._send(channel, meta, [result.frames])

        try:
            self._check_session(h["session"])
            chunks[rid] = self.service.submit_chunk(h["session"], arrays[0], reply, h.get("chunk_index"))
        except Exception as exc:
            reply(exc)

    def _send(self, channel: Channel, header: dict, arrays: list[np.ndarray] = ()) -> None:
        try:
            channel.send_nowait(header, arrays)
        except (TransportError, ConnectionError, RuntimeError):
            pass  # the worker went away
        except Exception as exc:  # an answer that cannot be encoded: say so, never leave the worker waiting
            log.exception("engine %d: could not send the answer to request %s", self.index, header.get("id"))
            try:
                channel.send_nowait(error_reply(header["id"], exc))
            except (TransportError, ConnectionError, RuntimeError):
                pass

    def _log_failure(self, op: str, exc: BaseException) -> None:
        if not isinstance(exc, A2EError) and type(exc).__name__ not in ("QueueFull", "SessionLimitReached"):
            log.error("engine %d: %s failed", self.index, op, exc_info=exc)

    def greeting(self) -> dict[str, Any]:
        s = self.service
        return {
            "engine": self.index,
            "generation": self.generation,
            "pid": os.getpid(),
            "device": s.model_info.device if s.model_info else s.settings.device,
            "num_identities": s.num_identities,
            "stats": self.stats(),
        }

    def stats(self) -> dict[str, Any]:
        st = self.service.stats(detail=True)
        st.update(engine=self.index, generation=self.generation, pid=os.getpid())
        return st

    def load(self) -> dict[str, int]:
        s = self.service
        return {"sessions": len(s.sessions), "queue": s.batcher.queued_windows if s.batcher else 0}

    async def serve(self, channel: Channel, rid: int, op: str, header: dict, arrays: list[np.ndarray]) -> None:
        try:
            reply, out = await self.run(op, header, arrays)
            reply.update(id=rid, ok=True, load=self.load())
        except asyncio.CancelledError:
            return  # the worker asked to stop; it expects no answer
        except Exception as exc:
            self._log_failure(op, exc)
            reply, out = error_reply(rid, exc), []
        try:
            await channel.send(reply, out)
        except (TransportError, ConnectionError, RuntimeError):
            pass

    async def run(self, op: str, h: dict, arrays: list[np.ndarray]) -> tuple[dict, list[np.ndarray]]:
        s = self.service
        if op == "open":
            o = await s.open_session(
                h["identity"], h.get("seed"), h["mode"], LoudnessMode(h["loudness"]), h.get("client", ""), h.get("tuning")
            )
            return {"session_id": o.session_id, "context_mode": o.context_mode, "loudness": o.loudness}, []
        if op == "close":
            closed = await s.close_session(h["session"])
            return {"closed": None if closed is None else asdict(closed)}, []
        if op == "clip":
            frames = await s.infer_clip(
                arrays[0],
                h["identity"],
                movement_smooth=h["movement_smooth"],
                brow_movement=h["brow_movement"],
                seed=h.get("seed"),
                ex_vol=h["ex_vol"],
                sample_rate=h["sample_rate"],
                loudness=LoudnessMode(h["loudness"]),
            )
            return {}, [frames]
        if op == "position":
            p = await s.session_position(h["session"])
            reply = {"chunks": p.chunks, "frames": p.frames, "samples": p.samples, "context_mode": p.context_mode}
            if p.last is None:
                return reply, []
            reply["last"] = {"chunk_index": p.last.chunk_index, "audio_seconds": p.last.audio_seconds,
                             "start_time": p.last.start_time, "context_mode": p.last.context_mode}  # fmt: skip
            return reply, [p.last.frames]
        if op == "stats":
            return {"stats": self.stats()}, []
        raise ValueError(f"unknown operation {op!r}")

    def _check_session(self, session_id: str) -> None:
        if self.service.settings.shared_state:
            return  # any engine serves any session: its state is in the shared store
        origin = engine_of(session_id)
        if origin is not None and origin[0] == self.index and origin[1] != self.generation % 256:
            raise SessionNotFound(f"session lost: its engine restarted ({session_id}); open a new session")


async def _expire(service: InferenceService) -> None:
    while True:
        await service.check_state()
        await asyncio.sleep(EXPIRY_INTERVAL_S)
        service.expire_sessions()


async def serve(server: EngineServer, path: str, ready: Connection) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    unix = await asyncio.start_unix_server(server.handle, path)
    expiry = asyncio.ensure_future(_expire(server.service))
    ready.send({"ok": True, "pid": os.getpid()})
    ready.close()
    await stop.wait()
    # The HTTP workers drained before the supervisor stopped us: finish what
    # is still running for a moment, then go.
    server.service.begin_drain()
    unix.close()
    deadline = time.monotonic() + 2.0
    while server.service.batcher is not None and server.service.batcher.queued_windows and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    expiry.cancel()


def main(index: int, generation: int, settings: Settings, path: str, ready: Connection) -> None:
    """Entry point of an engine process (multiprocessing, spawn)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which stops us in order
    configure_logging(settings.log_level)
    batch_metrics.set_engine(str(index))
    device = settings.device_list[index]
    service = InferenceService(replace(settings, device=device), session_id_tag=session_tag(index, generation))
    try:
        service.load()  # without weights it serves not-ready, answering 503 like a single-process server
        if settings.separation_preload:
            service.preload_separator()
    except A2EError as exc:
        ready.send({"ok": False, "error": type(exc).__name__, "message": str(exc)})
        ready.close()
        raise SystemExit(2) from None
    log.info("engine %d (generation %d) serving on %s at %s", index, generation, device, path)
    freeze_startup_objects()
    try:
        asyncio.run(serve(EngineServer(index, generation, service), path, ready))
    finally:
        service.close()
