"""The session store of one engine: streaming sessions' creation, lookup,
idle expiry and caps on their number (in all and per client address).

A ``Session`` holds its model-side state (``a2e.streaming.StreamState``) and
the chunks waiting to be applied to it; the store does not apply chunks
(``engine.streams`` does, one at a time, in submission order) and knows
nothing of how a chunk reached the engine.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from a2e.streaming import StreamState

from .protocol import SessionLimitReached

__all__ = ["Session", "SessionLimitReached", "SessionStore"]


@dataclass
class Session:
    """One streaming session: its model-side state and the chunks waiting to be
    applied to it, one at a time, in the order they were submitted."""

    id: str
    state: StreamState
    client: str = ""
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    chunks_done: int = 0
    first_chunk_at: float | None = None  # when its first chunk arrived (delivery rate)
    last_answer_at: float | None = None
    active: Any = None  # the chunk being applied (planned, at the model or being finished)
    waiting: deque = field(default_factory=deque)  # chunks submitted behind it
    # The last applied chunk's answer and its audio's digest: a retry of that
    # chunk (same chunk_index, same audio) gets the answer again.
    last_answer: Any = None
    last_digest: int | None = None
    # A shared store's copy (engine.shared_streams): False while this engine's
    # copy may be behind the store (never read, or a write of unknown outcome),
    # and the samples in each audio piece the store holds (while current).
    current: bool = True
    stored_audio: list[int] = field(default_factory=list)
    # Reads of the store in a row that found this copy current, and whether a
    # chunk run on it without a read was ever refused: a chunk without a
    # number skips the read once the session's chunks stay here (as a
    # balancer hashing on the session keeps them), never once that has failed.
    current_reads: int = 0
    unread_refused: bool = False

    @property
    def in_flight(self) -> int:
        return len(self.waiting) + (self.active is not None)


class SessionStore:
    def __init__(
        self,
        max_sessions: int,
        idle_timeout_s: float,
        on_change: Callable[[int, int], None] | None = None,
        max_per_client: int | None = None,
        id_tag: str = "",
    ) -> None:
        self.max_sessions = max_sessions
        # Hex digits that end every session id this store makes: an engine
        # writes its index and generation there, so a worker can route a
        # chunk from its id alone (see engine/client.py).
        self.id_tag = id_tag
        self.max_per_client = max_per_client or max_sessions
        self.idle_timeout_s = idle_timeout_s
        self._sessions: dict[str, Session] = {}
        self._per_client: dict[str, int] = {}
        # Told (open sessions, newly expired) whenever either changes.
        self._on_change = on_change or (lambda active, expired: None)

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, state: StreamState, client: str = "") -> Session:
        if len(self._sessions) >= self.max_sessions or self._per_client.get(client, 0) >= self.max_per_client:
            self.expire()
        if len(self._sessions) >= self.max_sessions:
            raise SessionLimitReached(
                f"the server has reached its limit of {self.max_sessions} open streaming sessions; "
                "close finished sessions (DELETE /api/infer_stream_close/{session_id}) or retry later"
            )
        if self._per_client.get(client, 0) >= self.max_per_client:
            raise SessionLimitReached(
                f"this client ({client}) has {self.max_per_client} open streaming sessions, the limit per client; "
                "close finished sessions (DELETE /api/infer_stream_close/{session_id}) or retry later"
            )
        session = Session(id=self.new_id(), state=state, client=client)
        self._sessions[session.id] = session
        self._per_client[client] = self._per_client.get(client, 0) + 1
        self._on_change(len(self._sessions), 0)
        return session

    def new_id(self) -> str:
        sid = str(uuid.uuid4())
        return sid[: -len(self.id_tag)] + self.id_tag if self.id_tag else sid

    def get(self, session_id: str) -> Session | None:
        session = self._sessions.get(session_id)
        if session is not None and self._is_idle(session, time.monotonic()):
            self._drop(session)
            self._on_change(len(self._sessions), 1)
            return None
        return session

    def close(self, session_id: str) -> Session | None:
        session = self._sessions.get(session_id)
        if session is not None:
            self._drop(session)
            self._on_change(len(self._sessions), 0)
        return session

    def adopt(self, session: Session) -> None:
        """Keep a copy of a session whose truth is elsewhere (a shared store):
        no caps apply, and the copy longest idle makes room when full."""
        if len(self._sessions) >= self.max_sessions:
            self.expire()
            idle = sorted((s for s in self._sessions.values() if s.in_flight == 0), key=lambda s: s.last_used)
            for s in idle[: len(self._sessions) - self.max_sessions + 1]:
                self._drop(s)
        self._sessions[session.id] = session
        self._per_client[session.client] = self._per_client.get(session.client, 0) + 1
        self._on_change(len(self._sessions), 0)

    def open_for(self, client: str) -> int:
        return self._per_client.get(client, 0)

    def _is_idle(self, session: Session, now: float) -> bool:
        return session.in_flight == 0 and now - session.last_used > self.idle_timeout_s

    def _drop(self, session: Session) -> None:
        if self._sessions.pop(session.id, None) is None:
            return
        left = self._per_client.get(session.client, 1) - 1
        if left > 0:
            self._per_client[session.client] = left
        else:
            self._per_client.pop(session.client, None)

    def expire(self) -> int:
        """Close sessions idle for longer than the timeout; returns how many."""
        now = time.monotonic()
        idle = [s for s in self._sessions.values() if self._is_idle(s, now)]
        for s in idle:
            self._drop(s)
        if idle:
            self._on_change(len(self._sessions), len(idle))
        return len(idle)

    def clear(self) -> None:
        for s in list(self._sessions.values()):
            self._drop(s)
        self._on_change(0, 0)
