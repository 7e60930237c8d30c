"""The worker side of the engines: one link per engine process, and a pool
that places work on them. The pool has the methods of an InferenceService
(``engine.protocol.Engine``), so the handlers cannot tell it from one in-process.

Placement: a new session goes to the engine with the fewest sessions (every
answer carries the engine's load); whole clips to the one with the shortest
queue. A chunk finds its engine from its session id alone (the engine wrote
its index into it), so any worker serves any chunk, with no shared table
and no lock. A worker keeps no session state.

When an engine dies, its link fails what was waiting (503, retry) and
reconnects once the supervisor has restarted it; the new engine answers its
predecessor's sessions "session lost" (404).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import zlib
from dataclasses import fields
from typing import Any

import numpy as np

from a2e.errors import A2EError, CheckpointError, ModelOutputError
from a2e.loudness import LoudnessMode
from a2e.separation import SeparationUnavailable
from batching.errors import BatcherStopped, Cancelled, QueueFull
from .protocol import (
    ChunkOutOfOrder,
    ChunkResult,
    Limits,
    SeparationBusy,
    SessionClosed,
    SessionLimitReached,
    SessionNotFound,
    SessionOpened,
    SessionPosition,
    ShuttingDown,
    StateUnavailable,
    shown_path,
)
from runtime.settings import Settings

from .session_ids import engine_of
from .transport import RING_BYTES, Channel, TransportError, open_channel

log = logging.getLogger("a2e.engine.client")

RECONNECT_S = 0.2
STATS_INTERVAL_S = 1.0
_KNOWN = {
    cls.__name__: cls
    for cls in (
        SessionNotFound,
        SessionLimitReached,
        BatcherStopped,
        SeparationUnavailable,
        SeparationBusy,
        ShuttingDown,
        ModelOutputError,
        Cancelled,
        CheckpointError,
        StateUnavailable,
    )
}


class EngineUnavailable(A2EError):
    """The engine for this work is not reachable now (restarting); retry shortly."""

    retry_after_s = 2.0


class RemoteError(A2EError):
    """An unexpected failure inside an engine (its log has the details)."""


def rebuild_error(reply: dict[str, Any]) -> Exception:
    name, message = reply.get("error", "Error"), reply.get("message", "")
    if name == "QueueFull":
        exc = QueueFull(0, reply.get("retry_after", 1.0))
        exc.args = (message,)
        return exc
    if name == "ChunkOutOfOrder":
        return ChunkOutOfOrder(message, reply.get("expected_chunk_index"))
    cls = _KNOWN.get(name)
    return cls(message) if cls is not None else RemoteError(f"{name}: {message}")


class EngineLink:
    """One worker's connection to one engine, reconnecting when it drops."""

    def __init__(self, index: int, path: str) -> None:
        self.index = index
        self.path = path
        self.channel: Channel | None = None
        self.greeting: dict[str, Any] = {}
        self.stats: dict[str, Any] = {}
        self.load = {"sessions": 0, "queue": 0}
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._acked = 0
        self._connected = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def up(self) -> bool:
        return self.channel is not None

    async def start(self, wait_s: float) -> None:
        self._task = asyncio.ensure_future(self._run())
        try:
            await asyncio.wait_for(self._connected.wait(), wait_s)
        except asyncio.TimeoutError:
            log.warning("engine %d not reachable at %s yet", self.index, self.path)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._drop(EngineUnavailable("the server is shutting down"))

    async def _run(self) -> None:
        while True:
            try:
                channel, greeting = await open_channel(self.path, {"op": "hello"})
            except (OSError, TransportError):
                await asyncio.sleep(RECONNECT_S)
                continue
            self.channel, self.greeting = channel, greeting
            self.stats = greeting.get("stats", {})
            # A restarted engine starts empty: forget what its predecessor carried.
            self.load = {"sessions": self.stats.get("sessions", 0), "queue": self.stats.get("queue_windows", 0)}
            self._acked = 0
            self._connected.set()
            log.info("connected to engine %d (generation %s, pid %s)", self.index, greeting.get("generation"), greeting.get("pid"))
            try:
                await self._read(channel)
            except TransportError:
                log.warning("engine %d went away; reconnecting", self.index)
            finally:
                self.channel = None
                self._connected.clear()
                self._drop(EngineUnavailable(f"engine {self.index} is restarting; retry shortly"))
                channel.close()

    async def _read(self, channel: Channel) -> None:
        while True:
            reply, arrays = await channel.recv()
            fut = self._pending.pop(reply.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result((reply, arrays))
            if "load" in reply:
                self.load = reply["load"]
            if channel.read_upto - self._acked > RING_BYTES // 4:
                # Quiet workers send nothing the engine could read acks from.
                self._acked = channel.read_upto
                asyncio.ensure_future(self._send_quietly(channel, {"op": "ack"}))

    def _drop(self, exc: Exception) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    async def _send_quietly(self, channel: Channel, header: dict[str, Any]) -> None:
        try:
            await channel.send(header)
        except (TransportError, ConnectionError, RuntimeError):
            pass

    async def call(self, op: str, header: dict[str, Any], arrays: list[np.ndarray] = ()) -> tuple[dict, list]:
        channel = self.channel
        if channel is None:
            raise EngineUnavailable(f"engine {self.index} is restarting; retry shortly")
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await channel.send({"op": op, "id": rid, **header}, arrays)
            reply, out = await fut
        except asyncio.CancelledError:
            if self._pending.pop(rid, None) is not None:  # still running there: stop it
                asyncio.ensure_future(self._send_quietly(channel, {"op": "cancel", "id": rid}))
            raise
        except (TransportError, ConnectionError) as exc:
            self._pending.pop(rid, None)
            raise EngineUnavailable(f"engine {self.index} is restarting; retry shortly") from exc
        if not reply.get("ok"):
            raise rebuild_error(reply)
        return reply, out


class EnginePool:
    """All engines as one ``Engine`` (see engine.protocol)."""

    def __init__(self, settings: Settings, paths: list[str]) -> None:
        self.settings = settings
        self.links = [EngineLink(i, p) for i, p in enumerate(paths)]
        self._stats_task: asyncio.Task | None = None
        self._next = itertools.count()

    async def connect(self, wait_s: float = 60.0) -> None:
        await asyncio.gather(*(link.start(wait_s) for link in self.links))
        self._stats_task = asyncio.ensure_future(self._refresh_stats())

    async def disconnect(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
        await asyncio.gather(*(link.stop() for link in self.links))

    async def _refresh_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            for link in self.links:
                if link.up:
                    try:
                        reply, _ = await link.call("stats", {})
                        link.stats = reply["stats"]
                        link.load = reply.get("load", link.load)
                    except A2EError:
                        pass

    # -- what the handlers read ---------------------------------------------------
    def _first(self) -> EngineLink | None:
        return next((link for link in self.links if link.up and link.stats), None)

    @property
    def ready(self) -> bool:
        return any(link.up and link.stats.get("ready") for link in self.links)

    @property
    def not_ready_reason(self) -> str:
        link = self._first()
        if link is None:
            return "no engine reachable (starting or restarting)"
        return link.stats.get("detail") or "model not loaded"

    @property
    def num_identities(self) -> int:
        link = self._first()
        return int(link.greeting.get("num_identities", 0)) if link else 0

    @property
    def limits(self) -> Limits:
        link = self._first()
        if link is None:
            return Limits(self.settings.max_audio_s, self.settings.max_chunk_s)
        known = {f.name for f in fields(Limits)}
        return Limits(**{k: v for k, v in link.stats["limits"].items() if k in known})

    def stats(self, detail: bool = False) -> dict[str, Any]:
        first = self._first()
        base = dict(first.stats) if first else {}
        engines = []
        for link in self.links:
            st = link.stats
            engines.append(
                {
                    "engine": link.index,
                    "state": "up" if link.up else "restarting",
                    "device": (st.get("model") or {}).get("device"),
                    "sessions": link.load.get("sessions", 0) if link.up else 0,
                    "queue_windows": link.load.get("queue", 0) if link.up else 0,
                    "generation": link.greeting.get("generation"),
                    "restarts": link.greeting.get("generation", 0),
                    "pid": link.greeting.get("pid") if detail else None,
                }
            )
        # Engines report full paths; what is shown follows this worker's --health-detail.
        model = base.get("model")
        if model is not None:
            model = {**model, "weights": shown_path(model.get("weights"), detail)}
        states = [link.stats["state"] for link in self.links if link.up and link.stats.get("state")]
        state = dict(states[0]) if states else None
        if state is not None:  # reachable only if every engine reaches it
            state["reachable"] = all(st.get("reachable") for st in states) if all(st.get("reachable") is not None for st in states) else None
        separation = dict(base.get("vocal_isolation") or {"available": None})
        separation["model_dir"] = shown_path(separation.get("model_dir"), detail)
        return {
            "ready": self.ready,
            "detail": None if self.ready else self.not_ready_reason,
            "model": model,
            "limits": base.get("limits") or {"max_audio_s": self.settings.max_audio_s,
                                             "max_chunk_s": self.settings.max_chunk_s, "audio_s_per_s": None},
            "sessions": sum(e["sessions"] for e in engines),
            "state": state,
            "queue_windows": sum(e["queue_windows"] for e in engines),
            "vocal_isolation": separation,
            "draining": any(link.stats.get("draining") for link in self.links if link.up),
            "gpu_available": any(link.stats.get("gpu_available") for link in self.links if link.up),
            "engines": engines,
        }  # fmt: skip

    # -- placement -------------------------------------------------------------------
    def _pick(self, key: str) -> EngineLink:
        up = [link for link in self.links if link.up]
        if not up:
            raise EngineUnavailable("no engine is reachable (restarting); retry shortly")
        start = next(self._next) % len(up)
        rotated = up[start:] + up[:start]  # ties go round
        return min(rotated, key=lambda link: link.load.get(key, 0))

    def _route(self, session_id: str) -> EngineLink:
        if self.settings.shared_state:
            # Any engine can serve the session; the same one each time keeps
            # its copy of the state current (one version check, no state read).
            up = [link for link in self.links if link.up]
            if not up:
                raise EngineUnavailable("no engine is reachable (restarting); retry shortly")
            return up[zlib.crc32(session_id.encode()) % len(up)]
        origin = engine_of(session_id)
        if origin is None or origin[0] >= len(self.links):
            raise SessionNotFound(f"Session not found: {session_id} (unknown, closed or expired)")
        return self.links[origin[0]]

    # -- the Engine methods ------------------------------------------------------------
    async def infer_clip(
        self,
        audio: np.ndarray,
        identity: int,
        *,
        movement_smooth: bool,
        brow_movement: bool,
        seed: int | None,
        ex_vol: bool = False,
        sample_rate: int = 16000,
        loudness: LoudnessMode = LoudnessMode.OFF,
    ) -> np.ndarray:
        header = {
            "identity": identity, "movement_smooth": movement_smooth, "brow_movement": brow_movement, "seed": seed,
            "ex_vol": ex_vol, "sample_rate": sample_rate, "loudness": loudness.value,
        }  # fmt: skip
        _, out = await self._pick("queue").call("clip", header, [audio])
        return out[0]

    async def open_session(
        self,
        identity: int,
        seed: int | None,
        mode: str,
        loudness: LoudnessMode = LoudnessMode.OFF,
        client: str = "",
        tuning: dict | None = None,
    ) -> SessionOpened:
        header = {"identity": identity, "seed": seed, "mode": mode, "loudness": loudness.value, "client": client, "tuning": tuning}
        reply, _ = await self._pick("sessions").call("open", header)
        return SessionOpened(reply["session_id"], reply["context_mode"], reply["loudness"])

    async def stream_chunk(self, session_id: str, audio: np.ndarray, chunk_index: int | None = None) -> ChunkResult:
        header = {"session": session_id, "chunk_index": chunk_index}
        reply, out = await self._route(session_id).call("chunk", header, [audio])
        return ChunkResult(out[0], reply["chunk_index"], reply["audio_seconds"], reply["start_time"], reply["context_mode"])

    async def session_position(self, session_id: str) -> SessionPosition:
        reply, out = await self._route(session_id).call("position", {"session": session_id})
        last = reply.get("last")
        answer = None if last is None else ChunkResult(out[0], **last)
        return SessionPosition(reply["chunks"], reply["frames"], reply["samples"], reply["context_mode"], answer)

    async def close_session(self, session_id: str) -> SessionClosed | None:
        try:
            link = self._route(session_id)
        except SessionNotFound:
            return None
        reply, _ = await link.call("close", {"session": session_id})
        return None if reply["closed"] is None else SessionClosed(**reply["closed"])
