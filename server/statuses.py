"""Which status (and detail, and headers) each error means to a client: one
table for the HTTP answers (app.py) and the WebSocket stream's error messages
(server/stream_socket.py). None means our fault: an internal error."""

from __future__ import annotations

from a2e.errors import AudioError, AudioTooLongError
from a2e.tuning import TuningError
from a2e.separation import SeparationUnavailable
from batching.errors import BatcherStopped, QueueFull
from engine.client import EngineUnavailable

from .connections import UploadRefused
from .credentials import Unauthenticated
from engine.protocol import (
    ChunkOutOfOrder,
    SeparationBusy,
    SessionLimitReached,
    SessionNotFound,
    ShuttingDown,
    StateUnavailable,
)
from .forms import RequestError

Status = tuple[int, str, dict[str, str] | None]


def status_of(exc: BaseException) -> Status | None:
    if isinstance(exc, RequestError):
        return exc.status, exc.detail, exc.headers
    if isinstance(exc, Unauthenticated):
        return 401, exc.detail, {"WWW-Authenticate": 'Bearer realm="lam-a2e"'}
    if isinstance(exc, TuningError):
        return 422, str(exc), None
    if isinstance(exc, AudioTooLongError):
        return 413, str(exc), None
    if isinstance(exc, AudioError):
        return 400, f"Invalid audio: {exc}", None
    if isinstance(exc, QueueFull):
        return 503, str(exc), {"Retry-After": str(int(exc.retry_after_s + 0.999))}
    if isinstance(exc, SessionLimitReached):
        return 429, str(exc), {"Retry-After": "5"}
    if isinstance(exc, SeparationUnavailable):
        return 503, f"vocal isolation (ex_vol=true) is unavailable: {exc}", {"Retry-After": "300"}
    if isinstance(exc, SeparationBusy):
        return 503, str(exc), {"Retry-After": "10"}
    if isinstance(exc, UploadRefused):
        return 503, str(exc), {"Retry-After": "1", "Connection": "close"}
    if isinstance(exc, SessionNotFound):
        return 404, str(exc), None
    if isinstance(exc, ChunkOutOfOrder):
        expected = exc.expected_chunk_index
        return 409, str(exc), None if expected is None else {"X-Expected-Chunk-Index": str(expected)}
    if isinstance(exc, StateUnavailable):
        return 503, str(exc), {"Retry-After": str(int(exc.retry_after_s + 0.999))}
    if isinstance(exc, ShuttingDown):
        return 503, str(exc), {"Retry-After": "1", "Connection": "close"}
    if isinstance(exc, EngineUnavailable):
        return 503, str(exc), {"Retry-After": str(int(exc.retry_after_s))}
    if isinstance(exc, BatcherStopped):
        return 503, f"Model not loaded: {exc}", None
    return None
