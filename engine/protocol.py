"""What a front door and an engine exchange: the ``Engine`` interface the
handlers call, the answers it gives, and the errors it raises.

It owns the words of that conversation, not either side of it: the engine
(``engine.service``) and the worker's link to engine processes
(``engine.client``) both speak it, and the front doors (``server/``) read
it. Light on purpose (no torch): HTTP worker processes import this, never
the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from a2e.errors import A2EError
from a2e.loudness import LoudnessMode

if TYPE_CHECKING:
    from runtime.settings import Settings


class SeparationBusy(A2EError):
    """Too many vocal-isolation requests are running or waiting."""


class ShuttingDown(A2EError):
    """The server is draining for shutdown and takes no more work."""


@dataclass
class Limits:
    """The length limits in force: the configured ones, lowered (with
    ``auto_limits``) to what the model processes within half the response
    timeout, measured at start-up."""

    max_audio_s: float
    max_chunk_s: float
    audio_s_per_s: float | None = None  # measured model speed (seconds of audio per second)


@dataclass
class ChunkResult:
    frames: np.ndarray
    chunk_index: int
    audio_seconds: float
    start_time: float  # session time of the chunk's first frame
    context_mode: str


@dataclass
class SessionClosed:
    chunks: int  # chunks applied
    frames: int  # frames sent
    seconds: float  # from the first chunk's arrival to the last answer (0 without chunks)


@dataclass
class SessionOpened:
    session_id: str
    context_mode: str
    loudness: str


class SessionNotFound(A2EError):
    """No open session has this id (unknown, closed, expired, or lost with its engine)."""


class SessionLimitReached(A2EError):
    """Too many open sessions, in all or for one client."""


class ChunkOutOfOrder(A2EError):
    """A numbered chunk the session cannot take now: ahead of the one it
    expects, or an old one whose answer is no longer kept, or a chunk number
    already applied with other audio. Says which chunk the session expects."""

    def __init__(self, message: str, expected: int | None = None) -> None:
        super().__init__(message)
        self.expected_chunk_index = expected


class StateUnavailable(A2EError):
    """The shared session store cannot be reached now; the chunk was not
    applied (or, when unknown, a retry with its chunk_index tells)."""

    retry_after_s = 1.0


@dataclass
class SessionPosition:
    """Where a session stands, for a stream resuming on another node: what it
    has applied, and the last chunk's answer (sent again when it was lost)."""

    chunks: int
    frames: int
    samples: int  # 16 kHz session audio applied: where the resumed audio starts
    context_mode: str
    last: ChunkResult | None


def shown_path(path: str | None, detail: bool) -> str | None:
    """File names only unless the operator asks for detail: absolute paths tell
    an attacker about the machine."""
    if path is None or detail:
        return path
    return path.replace("\\", "/").rsplit("/", 1)[-1]


class Engine(Protocol):
    """What the front doors need of the model side: an ``InferenceService`` in
    the same process (``--workers 0``) or an ``EnginePool`` of engine processes."""

    settings: "Settings"
    limits: Limits
    num_identities: int
    ready: bool
    not_ready_reason: str

    def stats(self, detail: bool = False) -> dict[str, Any]: ...

    async def infer_clip(self, audio: np.ndarray, identity: int, **options: Any) -> np.ndarray: ...

    async def open_session(
        self, identity: int, seed: int | None, mode: str, loudness: LoudnessMode, client: str, tuning: dict | None = None
    ) -> SessionOpened: ...

    async def stream_chunk(self, session_id: str, audio: np.ndarray, chunk_index: int | None = None) -> ChunkResult: ...

    async def session_position(self, session_id: str) -> SessionPosition: ...

    async def close_session(self, session_id: str) -> SessionClosed | None: ...
