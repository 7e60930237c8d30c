"""Streaming sessions whose state lives in a shared store (``--state
redis://...``, ``engine.redis_sessions``), so that any engine on any node
applies any chunk and a lost node loses no session.

It owns a chunk's trip through the store: read the session before the chunk
is planned (only its version when this engine's copy is current; nothing
at all when the chunk's number says the copy is current, or, for a chunk
without a number, when reads keep finding it current, as both do while a
balancer keeps a session's chunks on one node), write it back after the
batch (the state, and the chunk's audio appended to the stored audio; a
batch's chunks in one round trip) with a check that nobody moved the
session on meanwhile, and answer only then. A chunk whose session moved on
is undone and run again on the newer state; a chunk the store could not take is
undone and answered 503. Everything else (queueing, planning, the batch,
post-processing, numbered retries) is ``engine.streams``'s, unchanged.

The one idea: the store's record is the truth and this engine's sessions
are a cache of it. A chunk is answered only after its state is written, so
an answer a client holds is never lost with the node that gave it.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from a2e import streaming
from a2e.constants import SAMPLE_RATE, WINDOW_SAMPLES
from a2e.loudness import LoudnessMode
from runtime.settings import Settings

from . import metrics
from .protocol import ChunkOutOfOrder, ChunkResult, SessionClosed, SessionNotFound, SessionOpened, SessionPosition
from .redis_sessions import Commit, RedisSessions, pieces_to_keep
from .session_codec import audio_tail, encode_answer, encode_state
from .sessions import Session
from .streams import STREAM_SECONDS, StreamChunk, Streams, settled_by_index

log = logging.getLogger("a2e.service")

# Reads in a row that must find this engine's copy current before a chunk
# without a number runs on it unread: two, so that strict round robin
# (never the same engine twice) never bets, and random routing seldom does.
TRUSTED_READS = 2

# A chunk run again this many times because other engines kept moving its
# session on (unnumbered chunks raced from several nodes) is refused (409).
MAX_RERUNS = 3


class SharedStreams(Streams):
    def __init__(self, settings: Settings, session_id_tag: str = "") -> None:
        super().__init__(settings, session_id_tag)
        self.store = RedisSessions(
            settings.state, settings.session_idle_timeout_s, settings.max_sessions, settings.max_sessions_per_client,
            ack=settings.state_ack, ack_timeout_ms=settings.state_ack_timeout_ms, failover_s=settings.state_failover_s,
        )  # fmt: skip
        self._unwritten: list[tuple[StreamChunk, ChunkResult, float]] = []  # finished, to be written together

    def health(self) -> dict:
        return self.store.health()

    async def check_store(self) -> None:
        await self.store.check()

    # -- sessions ----------------------------------------------------------------------
    async def open(
        self,
        identity: int,
        seed: int | None,
        mode: str,
        loudness: LoudnessMode = LoudnessMode.OFF,
        client: str = "",
        tuning: dict | None = None,
    ) -> SessionOpened:
        state = self.new_state(identity, seed, mode, loudness, tuning)
        session_id = self.sessions.new_id()
        await self.store.create(session_id, client, encode_state(state))
        self.sessions.adopt(Session(id=session_id, state=state, client=client))
        return SessionOpened(session_id, state.mode.value, state.loudness_mode.value)

    async def close(self, session_id: str) -> SessionClosed | None:
        self.sessions.close(session_id)
        return await self.store.close(session_id)

    async def position(self, session_id: str) -> SessionPosition:
        n, state, last = await self.store.position(session_id)
        answer = last[0] if last is not None else None
        return SessionPosition(n, state.frames_sent, state.samples_received, state.mode.value, answer)

    def _session(self, session_id: str) -> Session:
        """This engine's copy, or an empty one that the store fills before its first chunk."""
        session = self.sessions.get(session_id)
        if session is None:
            session = Session(id=session_id, state=None, current=False)
            self.sessions.adopt(session)
        return session

    # -- chunks ------------------------------------------------------------------------------
    def start_next(self, session: Session) -> None:
        if session.active is None and session.waiting:
            chunk = session.waiting.popleft()
            session.active = chunk
            if session.current and session.state is not None and chunk.index == session.chunks_done + 1:
                # The next chunk by its number: run it on this copy without
                # reading the store; the write's version check still refuses
                # it if another engine moved the session on meanwhile.
                self.plan(chunk)
            elif (session.current and chunk.index is None and session.current_reads >= TRUSTED_READS
                  and not session.unread_refused):  # fmt: skip
                # No number, but the session's chunks stay here: the same bet,
                # which costs a chunk's run when lost, so it is made only after
                # reads found this copy current, and never again once lost.
                chunk.unread = True
                self.plan(chunk)
            else:
                asyncio.ensure_future(self._read_then_plan(chunk))

    async def _read_then_plan(self, chunk: StreamChunk) -> None:
        session = chunk.session
        try:
            fetched = await self.store.fetch(session.id, session.chunks_done if session.current else -1, chunk.index)
        except Exception as exc:  # noqa: BLE001 - SessionNotFound, StateUnavailable, a record we cannot read
            if not isinstance(exc, SessionNotFound) and not hasattr(exc, "retry_after_s"):
                log.exception("reading session %s from the store failed", session.id)
            self._finish(chunk, exc)
            if isinstance(exc, SessionNotFound):
                self.sessions.close(session.id)
            return
        behind = session.current and fetched.chunks_done < session.chunks_done
        if fetched.state is not None:
            session.state, session.chunks_done, session.client = fetched.state, fetched.chunks_done, fetched.client
            session.stored_audio = fetched.audio_pieces
        session.current = True
        session.current_reads = session.current_reads + 1 if fetched.state is None else 0
        session.last_answer, session.last_digest = fetched.last or (None, None)
        if chunk.replied:  # its client went away while the store answered
            self._finish(chunk, None)
        elif behind and chunk.index != fetched.chunks_done + 1:
            self._rolled_back(chunk, fetched.chunks_done, undo=False)
        elif settled_by_index(chunk):
            self._finish(chunk, None)
        else:
            self.plan(chunk)

    def _finish(self, chunk: StreamChunk, error: BaseException | None) -> None:
        """The chunk is over without a write: answer it (if still wanted) and go on with the session."""
        if error is not None:
            chunk.answer(error)
        chunk.session.active = None
        self.start_next(chunk.session)

    def succeed(self, chunk: StreamChunk, frames: np.ndarray, now: float) -> float:
        """Queue the session's new state for writing, then answer once written
        (the audio seconds are counted once the write has landed, so return
        0 here). The chunks a batch finishes are written in one round trip."""
        session = chunk.session
        frames = streaming.tune(session.state, frames)
        result = ChunkResult(frames, session.chunks_done + 1, len(chunk.audio) / SAMPLE_RATE, chunk.start_time,
                             session.state.mode.value)  # fmt: skip
        if not self._unwritten:
            asyncio.get_running_loop().call_soon(self._write_batch)  # after the batch's last chunk
        self._unwritten.append((chunk, result, now))
        return 0.0

    def _write_batch(self) -> None:
        batch, self._unwritten = self._unwritten, []
        asyncio.ensure_future(self._write(batch))

    async def _write(self, batch: list[tuple[StreamChunk, ChunkResult, float]]) -> None:
        kept: list[list[int]] = []
        try:
            writes = []
            for chunk, result, _ in batch:
                write, stored = _commit_of(chunk, result)
                writes.append(write)
                kept.append(stored)
            outcomes = await self.store.commit(writes)
        except Exception as exc:  # noqa: BLE001 - StateUnavailable: applied or not, the store will say
            outcomes = [exc] * len(batch)
        for (chunk, result, now), stored, outcome in zip(batch, kept + [[]] * (len(batch) - len(kept)), outcomes):
            if isinstance(outcome, Exception) and not hasattr(outcome, "retry_after_s"):
                log.error("writing session %s to the store failed", chunk.session.id, exc_info=outcome)
            self._written(chunk, result, now, stored, outcome)

    def _written(self, chunk: StreamChunk, result: ChunkResult, now: float, stored: list[int],
                 outcome: tuple[str, int] | Exception) -> None:  # fmt: skip
        session = chunk.session
        if isinstance(outcome, Exception):
            session.current, session.current_reads = False, 0
            self._undo(chunk)
            self._finish(chunk, outcome)
            return
        status, n = outcome
        if status == "ok":
            session.chunks_done = n
            session.stored_audio = stored
            session.last_used = session.last_answer_at = now
            session.last_answer, session.last_digest = result, chunk.digest
            STREAM_SECONDS.inc(result.audio_seconds)
            chunk.answer(result)
            session.active = None
            self.start_next(session)
            return
        self._undo(chunk)
        if status == "gone":
            self.sessions.close(session.id)
            self._finish(chunk, SessionNotFound(f"Session not found: {session.id} (closed or expired)"))
            return
        if n < session.chunks_done:
            # The store is behind what this engine wrote and answered: a
            # failover promoted a replica that lacked the session's last chunks.
            self._rolled_back(chunk, n)
            return
        # Another engine applied a chunk meanwhile: run this one again on the newer state.
        metrics.STATE_CONFLICTS.inc()
        session.current, session.current_reads = False, 0
        session.unread_refused |= chunk.unread
        chunk.unread = False
        chunk.reruns += 1
        if chunk.reruns > MAX_RERUNS:
            self._finish(chunk, ChunkOutOfOrder(
                f"the session kept moving on while this chunk ran (chunks sent at once to several servers); "
                f"send a session's chunks one after another; the session expects chunk_index {n + 1}", n + 1))  # fmt: skip
            return
        chunk.plans, chunk.future = [], None
        session.waiting.appendleft(chunk)
        session.active = None
        self.start_next(session)


    def _rolled_back(self, chunk: StreamChunk, n: int, undo: bool = True) -> None:
        """The store holds fewer chunks of the session than this engine wrote
        and answered (a failover promoted a replica that lacked the last
        ones): refuse the chunk naming the one the store expects, from which
        the client sends its audio again (a2e_client keeps it)."""
        session = chunk.session
        metrics.STATE_ROLLBACKS.inc()
        log.warning("session %s: the store is back at chunk %d (a failover lost later chunks)", session.id, n)
        if undo:
            self._undo(chunk)
        session.current, session.current_reads = False, 0
        self._finish(chunk, ChunkOutOfOrder(
            f"the session store lost this session's chunks after chunk {n} in a failover; send the audio again "
            f"from chunk_index {n + 1} (the session expects chunk_index {n + 1})", n + 1))  # fmt: skip


def _commit_of(chunk: StreamChunk, result: ChunkResult) -> tuple[Commit, list[int]]:
    """The store write for a finished chunk, and the samples of each audio
    piece the store will hold once it lands."""
    session = chunk.session
    added = session.state.samples_received - chunk.saved["samples_received"]
    pieces = [*session.stored_audio, added] if added else session.stored_audio
    keep = pieces_to_keep(pieces)
    if added >= WINDOW_SAMPLES:
        pieces, keep = [WINDOW_SAMPLES], 0  # the chunk's last window replaces all
    write = Commit(
        session.id, session.client, session.chunks_done, encode_state(session.state),
        encode_answer(result, chunk.digest if chunk.digest is not None else -1), session.state.frames_sent,
        _wall_clock(session.first_chunk_at), audio_tail(session.state, added), keep,
    )  # fmt: skip
    return write, pieces[len(pieces) - keep :] if keep else pieces


def _wall_clock(monotonic: float | None) -> float:
    """A moment of this process's monotonic clock on the wall clock (the store's
    times are compared across nodes)."""
    now = time.time()
    return now if monotonic is None else now - (time.monotonic() - monotonic)
