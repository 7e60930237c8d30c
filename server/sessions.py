"""Streaming sessions: creation, lookup, idle expiry, a cap on their number,
and strict per-session ordering of chunks.

A chunk takes a ticket when its request arrives. Its audio context is
planned in ticket order and its frames are post-processed in ticket order,
whatever order decoding and the model finish in; a chunk that fails gives
its turn up so the next one proceeds.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from a2e.streaming import StreamState


class SessionLimitReached(RuntimeError):
    pass


@dataclass
class Session:
    id: str
    state: StreamState
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    chunks_done: int = 0
    _next_ticket: int = 0
    _planned: int = 0
    _finished: int = 0
    _cond: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def in_flight(self) -> int:
        return self._next_ticket - self._finished

    def ticket(self) -> int:
        self.last_used = time.monotonic()
        t = self._next_ticket
        self._next_ticket += 1
        return t

    @asynccontextmanager
    async def turn(self, ticket: int, stage: str) -> Iterator[None]:
        """Hold the session for ``stage`` ('plan' or 'finish') in ticket order."""
        attr = "_planned" if stage == "plan" else "_finished"
        async with self._cond:
            await self._cond.wait_for(lambda: getattr(self, attr) >= ticket)
        try:
            yield
        finally:
            async with self._cond:
                setattr(self, attr, max(getattr(self, attr), ticket + 1))
                self._cond.notify_all()

    async def skip(self, ticket: int) -> None:
        """Give up both turns of a failed chunk (in order, so nothing is skipped early)."""
        async with self.turn(ticket, "plan"):
            pass
        async with self.turn(ticket, "finish"):
            pass


class SessionStore:
    def __init__(
        self, max_sessions: int, idle_timeout_s: float, on_change: Callable[[int, int], None] | None = None
    ) -> None:
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self._sessions: dict[str, Session] = {}
        # Told (open sessions, newly expired) whenever either changes.
        self._on_change = on_change or (lambda active, expired: None)

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, state: StreamState) -> Session:
        if len(self._sessions) >= self.max_sessions:
            self.expire()
        if len(self._sessions) >= self.max_sessions:
            raise SessionLimitReached(
                f"the server has reached its limit of {self.max_sessions} open streaming sessions; "
                "close finished sessions (DELETE /api/infer_stream_close/{session_id}) or retry later"
            )
        session = Session(id=str(uuid.uuid4()), state=state)
        self._sessions[session.id] = session
        self._on_change(len(self._sessions), 0)
        return session

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

    def _is_idle(self, session: Session, now: float) -> bool:
        return session.in_flight == 0 and now - session.last_used > self.idle_timeout_s

    def _drop(self, session: Session) -> None:
        self._sessions.pop(session.id, None)

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
