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
from .protocol import ChunkResult, SessionClosed, SessionNotFound, SessionOpened
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

    __slots__ = ("session", "audio", "reply", "loop", "saved", "start_time", "plans", "future", "replied")

    def __init__(
        self,
        session: Session,
        audio: np.ndarray,
        reply: Callable[[ChunkResult | BaseException], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.session = session
        self.audio = audio
        self.reply = reply
        self.loop = loop
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
    def open(
        self,
        identity: int,
        seed: int | None,
        mode: str,
        loudness: LoudnessMode = LoudnessMode.OFF,
        client: str = "",
        tuning: dict | None = None,
    ) -> SessionOpened:
        """``tuning`` is an ``a2e.tuning`` spec, already validated by the front."""
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
        session = self.sessions.create(state, client)
        return SessionOpened(session.id, state.mode.value, state.loudness_mode.value)

    def close(self, session_id: str) -> SessionClosed | None:
        """What the closed session did, or None when there was no such session."""
        session = self.sessions.close(session_id)
        if session is None:
            return None
        seconds = 0.0
        if session.first_chunk_at is not None and session.last_answer_at is not None:
            seconds = session.last_answer_at - session.first_chunk_at
        return SessionClosed(session.chunks_done, session.state.frames_sent, seconds)

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
        self, session_id: str, audio: np.ndarray, reply: Callable[[ChunkResult | BaseException], None]
    ) -> StreamChunk:
        """Queue one 16 kHz chunk on its session (see ``InferenceService.submit_chunk``)."""
        session = self._session(session_id)
        chunk = StreamChunk(session, np.asarray(audio, dtype=np.float32), reply, asyncio.get_running_loop())
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
            state = session.state
            session.active = chunk
            chunk.saved = state.snapshot()
            chunk.start_time = state.frames_planned / 30.0
            try:
                chunk.plans = streaming.plan_chunk(state, chunk.audio)
                plans = chunk.plans
                if not plans:  # shorter than what completes a frame: no window, no frames
                    STREAM_SECONDS.inc(self.succeed(chunk, np.zeros((0, NUM_BLENDSHAPES), dtype=np.float32), time.monotonic()))
                    continue
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
        chunk.answer(ChunkResult(frames, session.chunks_done, seconds, chunk.start_time, session.state.mode.value))
        session.active = None
        return seconds
