"""Streaming sessions on one engine and their chunk queue: opening and
closing sessions, queueing each chunk on its session, planning its windows
for the batcher, and answering, undoing or failing it.

A streaming chunk is applied to its session whole or not at all: the
session's state is snapshotted when the chunk starts and restored if
anything (cancellation included) stops it before its answer. A session's
chunks are applied one at a time, in the order submitted (``Session.waiting``).

It owns the session store and the chunks' life; readiness and draining are
checked by ``engine.service`` before it is called, and a finished batch's
post-processing is ``engine.handback``'s, which calls back into ``succeed``,
``fail``, ``abandon`` and ``start_next``. Everything here runs on the event
loop, the one thread that touches session state.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import zlib
from collections.abc import Callable

import numpy as np

from a2e import streaming
from a2e import tuning as tuning_spec
from a2e.constants import NUM_BLENDSHAPES, SAMPLE_RATE
from a2e.loudness import LoudnessMode, StreamLoudness
from batching import MicroBatcher
from batching import metrics as batch_metrics
from batching.batcher import TaggedResult
from runtime.settings import Settings

from . import metrics
from .protocol import ChunkOutOfOrder, ChunkResult, SessionClosed, SessionNotFound, SessionOpened, SessionPosition
from .sessions import Session, SessionStore

log = logging.getLogger("a2e.service")
STREAM_SECONDS = metrics.AUDIO_SECONDS.labels("stream")
STREAM_FRAMES = metrics.FRAMES.labels("stream")


def _session_metrics(active: int, expired: int) -> None:
    metrics.SESSIONS_ACTIVE.labels(batch_metrics.engine).set(active)
    if expired:
        metrics.SESSIONS_EXPIRED.labels(batch_metrics.engine).inc(expired)


class StreamChunk:
    """A streaming chunk from its submission to its answer."""

    __slots__ = ("session", "audio", "reply", "loop", "saved", "start_time", "plans", "future", "replied", "index",
                 "digest", "reruns", "unread")  # fmt: skip

    def __init__(
        self,
        session: Session,
        audio: np.ndarray,
        reply: Callable[[ChunkResult | BaseException], None],
        loop: asyncio.AbstractEventLoop,
        index: int | None = None,
    ) -> None:
        self.session = session
        self.audio = audio
        self.reply = reply
        self.loop = loop
        self.index = index  # the client's number for it (chunk_index), if it gave one
        # Its audio's digest, to tell a retry from another chunk sent with the same number.
        self.digest = zlib.crc32(audio) if index is not None else None
        self.reruns = 0  # times a shared store's newer state made it start again
        self.unread = False  # run on a shared store's session without reading the store first
        self.saved: dict | None = None
        self.start_time = 0.0
        self.plans: list[streaming.ChunkPlan] = []
        self.future: TaggedResult | None = None
        self.replied = False

    def answer(self, result: ChunkResult | BaseException) -> None:
        if self.replied:
            return
        self.replied = True
        try:
            self.reply(result)
        except Exception:  # a reply that cannot be delivered must not stop the batch
            log.exception("answering a chunk failed")


class Streams:
    def __init__(self, settings: Settings, session_id_tag: str = "") -> None:
        self.settings = settings
        self.sessions = SessionStore(
            settings.max_sessions,
            settings.session_idle_timeout_s,
            _session_metrics,
            settings.max_sessions_per_client,
            session_id_tag,
        )
        self.batcher: MicroBatcher | None = None  # set when the model is loaded

    # -- sessions --------------------------------------------------------------
    async def open(
        self,
        identity: int,
        seed: int | None,
        mode: str,
        loudness: LoudnessMode = LoudnessMode.OFF,
        client: str = "",
        tuning: dict | None = None,
    ) -> SessionOpened:
        """``tuning`` is an ``a2e.tuning`` spec, already validated by the front."""
        state = self.new_state(identity, seed, mode, loudness, tuning)
        session = self.sessions.create(state, client)
        return SessionOpened(session.id, state.mode.value, state.loudness_mode.value)

    def new_state(
        self, identity: int, seed: int | None, mode: str, loudness: LoudnessMode, tuning: dict | None
    ) -> streaming.StreamState:
        rng = np.random.default_rng(seed if seed is not None else secrets.randbits(64))
        context = streaming.ContextMode(mode)
        state = streaming.StreamState(
            identity=identity,
            rng=rng,
            mode=context,
            # The reference mode reproduces the reference: never level-adjusted.
            loudness_mode=LoudnessMode.OFF if context is streaming.ContextMode.REFERENCE else loudness,
        )
        if state.loudness_mode is not LoudnessMode.OFF:
            state.loudness = StreamLoudness(self.settings.loudness_target_lufs)
        state.tuning = tuning_spec.parse(tuning).tuning
        return state

    async def position(self, session_id: str) -> SessionPosition:
        """Where the session stands (a stream resuming on another connection)."""
        session = self._session(session_id)
        state = session.state
        return SessionPosition(session.chunks_done, state.frames_sent, state.samples_received, state.mode.value, session.last_answer)

    async def close(self, session_id: str) -> SessionClosed | None:
        """What the closed session did, or None when there was no such session."""
        session = self.sessions.close(session_id)
        if session is None:
            return None
        seconds = 0.0
        if session.first_chunk_at is not None and session.last_answer_at is not None:
            seconds = session.last_answer_at - session.first_chunk_at
        return SessionClosed(session.chunks_done, session.state.frames_sent, seconds)

    def health(self) -> dict:
        """What /api/health says of where sessions live."""
        return {"store": "memory", "reachable": True}

    async def check_store(self) -> None:
        """Nothing to check: the sessions are in this process."""

    def expire(self) -> int:
        n = self.sessions.expire()
        if n:
            log.info("expired %d idle session(s)", n)
        return n

    def _session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise SessionNotFound(f"Session not found: {session_id} (unknown, closed or expired)")
        return session

    # -- chunks ------------------------------------------------------------------
    def submit(
        self,
        session_id: str,
        audio: np.ndarray,
        reply: Callable[[ChunkResult | BaseException], None],
        chunk_index: int | None = None,
    ) -> StreamChunk:
        """Queue one 16 kHz chunk on its session (see ``InferenceService.submit_chunk``)."""
        session = self._session(session_id)
        audio = np.asarray(audio, dtype=np.float32)
        chunk = StreamChunk(session, audio, reply, asyncio.get_running_loop(), chunk_index)
        session.last_used = time.monotonic()
        if session.first_chunk_at is None:
            session.first_chunk_at = session.last_used
        session.waiting.append(chunk)
        if session.active is None:
            self.start_next(session)
        return chunk

    def cancel(self, chunk: StreamChunk) -> None:
        """The chunk's client went away: drop it, leaving its session as if it
        had never come. A chunk already answered stays applied."""
        if chunk.replied:
            return
        chunk.replied = True  # no answer is wanted any more
        session = chunk.session
        if session.active is not chunk:
            try:
                session.waiting.remove(chunk)
            except ValueError:
                pass
            return
        if chunk.future is not None and chunk.future.cancel():  # still queued: gone from the batch
            self.abandon(chunk)
        # else the model has it; the hand-back sees that no answer is wanted

    def start_next(self, session: Session) -> None:
        """Plan the session's next waiting chunk and queue its windows."""
        while session.active is None and session.waiting:
            chunk = session.waiting.popleft()
            session.active = chunk
            if settled_by_index(chunk):
                session.active = None
                continue
            self.plan(chunk)

    def plan(self, chunk: StreamChunk) -> None:
        """Snapshot the session, plan the chunk's windows and queue them (or
        answer it at once when it completes no frame)."""
        session = chunk.session
        state = session.state
        chunk.saved = state.snapshot()
        chunk.start_time = state.frames_planned / 30.0
        try:
            chunk.plans = plans = streaming.plan_chunk(state, chunk.audio)
            if not plans:  # shorter than what completes a frame: no window, no frames
                STREAM_SECONDS.inc(self.succeed(chunk, np.zeros((0, NUM_BLENDSHAPES), dtype=np.float32), time.monotonic()))
                return
            # The windows go as parts (views of the session's audio): the batcher copies them once.
            windows = [p.parts for p in plans]
            chunk.future = self.batcher.submit_windows(windows, [state.identity] * len(plans), tag=chunk)
        except Exception as exc:  # QueueFull, stopped batcher, bad audio: this chunk only
            chunk.answer(exc)
            self._undo(chunk)

    @staticmethod
    def _undo(chunk: StreamChunk) -> None:
        chunk.session.state.restore(chunk.saved)  # nothing of it stays: context, frames, generator, level
        chunk.session.active = None

    def abandon(self, chunk: StreamChunk) -> None:
        """Undo a started chunk nobody waits for, and go on with the next."""
        self._undo(chunk)
        self.start_next(chunk.session)

    def fail(self, chunk: StreamChunk, exc: BaseException) -> None:
        chunk.answer(exc)
        self.abandon(chunk)

    def succeed(self, chunk: StreamChunk, frames: np.ndarray, now: float) -> float:
        """Answer the chunk; returns its audio seconds (the caller counts them, once per batch)."""
        session = chunk.session
        session.chunks_done += 1
        session.last_used = session.last_answer_at = now
        seconds = len(chunk.audio) / SAMPLE_RATE
        frames = streaming.tune(session.state, frames)
        result = ChunkResult(frames, session.chunks_done, seconds, chunk.start_time, session.state.mode.value)
        session.last_answer, session.last_digest = result, chunk.digest
        chunk.answer(result)
        session.active = None
        return seconds


def settled_by_index(chunk: StreamChunk) -> bool:
    """Whether the client's number for the chunk settles it without running
    it: a retry of the last applied chunk (same number, same audio) gets its
    answer again; any other number but the next one is refused, naming the
    one the session expects. Unnumbered chunks are applied in turn."""
    index, session = chunk.index, chunk.session
    expected = session.chunks_done + 1
    if index is None or index == expected:
        return False
    if index == session.chunks_done and session.last_answer is not None and chunk.digest == session.last_digest:
        metrics.CHUNKS_REPLAYED.inc()
        chunk.answer(session.last_answer)
        return True
    if index == session.chunks_done and session.last_answer is not None:
        why = f"chunk {index} was already applied to this session with other audio"
    elif index < expected:
        why = f"chunk {index} was applied earlier and only the last chunk's answer is kept"
    else:
        why = f"chunk {index} is ahead of the session"
    chunk.answer(ChunkOutOfOrder(f"{why}; the session expects chunk_index {expected}", expected))
    return True
