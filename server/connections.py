"""Connections and request bodies under hostile clients: a cap on open
connections, deadlines that a client trickling bytes cannot extend, and a
memory budget for request bodies held at once.

Sanic's own timeouts restart on every byte received, so a client sending a
byte a second holds a connection (and its buffer) forever. Here:

* headers must be complete within ``header_timeout_s`` of their first byte;
* a body must keep arriving (no silence longer than ``body_idle_timeout_s``)
  and arrive at ``body_min_rate_kb`` KiB/s on average after that much grace;
* past a deadline the client gets 408 and the connection is closed, and
  aborted a second later if the client still does not let go;
* at ``max_connections`` (kept below the process's open-files limit, whose
  soft value start-up raises to the hard one) a new connection closes the
  oldest idle one (keep-alive, or never used), so an admin's health check
  gets through 1,000 idle sockets; only when none is idle does it get 503
  and is closed at once;
* a body is read only when its declared size fits the upload memory budget
  (503 + Retry-After otherwise), and its share is returned when the request
  ends, however it ends;
* once a request's body is in, reading resumes, so a client that hangs up
  while its request is processed is noticed (Sanic pauses reading when its
  buffer fills and would otherwise see the close only when it answers), and
  the request's work is cancelled.
"""

from __future__ import annotations

import itertools
import logging
import os
import resource
import threading
import time
from dataclasses import dataclass

from sanic.exceptions import PayloadTooLarge, RequestTimeout
from sanic.request import Request
from sanic.server.protocols.websocket_protocol import WebSocketProtocol

from . import metrics, socket_frames
from .access import BROWSER_SUBPROTOCOL

log = logging.getLogger("a2e.connections")

CHECK_INTERVAL_S = 0.5
ABORT_AFTER_S = 1.0
# File descriptors kept free for the model, logs, the listening sockets, and
# idle connections being closed to make room (a burst of accepts at the cap).
RESERVED_FDS = 256
# A soft limit raised to an unlimited hard one stops here (the kernel's usual nr_open).
MAX_RAISED_FDS = 1 << 20
_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"retry-after: 1\r\ncontent-length: 64\r\n\r\n"
    + b'{"detail": "the server has too many open connections; retry"}'.ljust(64)
)


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    header_timeout_s: float
    body_idle_timeout_s: float
    body_min_rate: float  # bytes per second


def raise_open_files_limit() -> None:
    """Raise the soft open-files limit to the hard one (children inherit it):
    a soft limit of 1,024 is one idle client with 1,000 sockets away from
    refusing everyone. Logs both."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = MAX_RAISED_FDS if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("open files: could not raise the soft limit %d towards %s: %s", soft, hard, exc)
            return
    new_soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    log.info("open files: soft limit %s (was %s), hard limit %s", new_soft, soft,
             "unlimited" if hard == resource.RLIM_INFINITY else hard)  # fmt: skip


def max_connections_allowed(wanted: int) -> int:
    """``wanted``, lowered to what the open-files limit allows."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - RESERVED_FDS))


class UploadBudget:
    """Bytes of request bodies that may be held in memory at once."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.used = 0
        self._lock = threading.Lock()

    def acquire(self, size: int) -> bool:
        with self._lock:
            # One body is always admitted when nothing else is held, so no
            # legal request can be refused forever.
            if self.used and self.used + size > self.limit:
                return False
            self.used += size
        metrics.UPLOAD_BYTES_HELD.set(self.used)
        return True

    def release(self, size: int) -> None:
        with self._lock:
            self.used = max(0, self.used - size)
        metrics.UPLOAD_BYTES_HELD.set(self.used)


class UploadRefused(Exception):
    """The upload budget is spent: answered 503 with Retry-After before the body is read."""


class BoundedRequest(Request):
    """A request whose body is read only within the upload memory budget, with
    a cheap id (process, counter) when the client sends no X-Request-ID."""

    _ids = itertools.count(1)
    _prefix = f"{os.getpid():x}-"

    @classmethod
    def generate_id(cls, *_: object) -> str:
        return cls._prefix + str(next(cls._ids))

    async def receive_body(self) -> None:
        budget: UploadBudget | None = getattr(self.app.ctx, "upload_budget", None)
        # Only Sanic's own server (not ASGI, whose server owns reading) says request_body.
        if budget is not None and getattr(self.stream, "request_body", None):
            declared = self.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.app.config.REQUEST_MAX_SIZE:
                # Before the first read, which is what sends "100 Continue": a client
                # that announced the body with Expect gets the 413 without sending it.
                raise PayloadTooLarge("Request body exceeds the size limit")
            size = int(declared) if declared.isdigit() else int(self.app.config.REQUEST_MAX_SIZE)
            if not budget.acquire(size):
                metrics.UPLOADS_REFUSED.inc()
                raise UploadRefused(f"too many large uploads in progress ({budget.used // 2**20} MiB held); retry")
            self.ctx.upload_held = size
        await super().receive_body()
        # Read on (Sanic paused when its buffer filled) to notice a hang-up while the request is processed.
        resume = getattr(self.transport, "resume_reading", None)
        if resume is not None and getattr(self.stream, "request_body", True) is None:
            resume()


def release_upload(request: Request | None) -> None:
    """Return the request's share of the upload budget (idempotent)."""
    if request is None:
        return
    held = getattr(request.ctx, "upload_held", 0)
    if held:
        request.ctx.upload_held = 0
        budget: UploadBudget | None = getattr(request.app.ctx, "upload_budget", None)
        if budget is not None:
            budget.release(held)


class GuardedHttpProtocol(WebSocketProtocol):
    """Sanic's HTTP/1.1 protocol (with its WebSocket upgrade, for /api/stream)
    with a connection cap and deadlines that do not restart on every byte (see
    the module docstring)."""

    __slots__ = ("_refused", "_guard_timer", "_stage", "_stage_since", "_aborting")

    async def websocket_handshake(self, request, subprotocols=None):
        # A browser, which cannot set headers on a WebSocket, offers ["a2e",
        # "a2e-key.KEY"] (server.access reads the key): it is answered "a2e",
        # never the key. Clients that offer no subprotocol are answered without one.
        offered = [p.strip() for p in request.headers.get("sec-websocket-protocol", "").split(",")]
        if subprotocols is None and BROWSER_SUBPROTOCOL in offered:
            subprotocols = [BROWSER_SUBPROTOCOL]
        # Binary messages (audio packets of /api/stream) by a plain call: see server/socket_frames.py.
        return socket_frames.install(await super().websocket_handshake(request, subprotocols))

    def connection_made(self, transport) -> None:
        self._refused = False
        self._guard_timer = None
        self._stage = None
        self._stage_since = time.monotonic()
        self._aborting = False
        limits: ConnectionLimits = self.app.ctx.connection_limits
        if len(self.connections) >= limits.max_connections and not self._close_oldest_idle():
            self._refused = True
            metrics.CONNECTIONS_REFUSED.inc()
            transport.write(_REFUSED)
            transport.close()
            return
        super().connection_made(transport)
        metrics.CONNECTIONS_OPEN.set(len(self.connections))
        self._guard_timer = self.loop.call_later(CHECK_INTERVAL_S, self._check_deadlines)

    def _close_oldest_idle(self) -> bool:
        """Make room at the cap: close the connection idle for longest (no
        request in progress, not a WebSocket); False when there is none."""
        oldest = None
        for conn in self.connections:
            transport = conn.transport
            if transport is None or transport.is_closing() or getattr(conn, "websocket", None) is not None:
                continue
            if conn.http is not None and conn.http.stage.name != "IDLE":
                continue
            if oldest is None or conn._time < oldest._time:
                oldest = conn
        if oldest is None:
            return False
        oldest.close_if_idle()
        metrics.IDLE_CLOSED_AT_CAP.inc()
        return True

    def connection_lost(self, exc) -> None:
        if self._refused:
            return
        if self._guard_timer is not None:
            self._guard_timer.cancel()
        if self._http is not None:
            release_upload(self._http.request)
        super().connection_lost(exc)
        metrics.CONNECTIONS_OPEN.set(len(self.connections))

    def _check_deadlines(self) -> None:
        self._guard_timer = None
        http = self._http
        if http is None or self.transport is None or self.transport.is_closing():
            return
        if self.websocket is not None:
            return  # upgraded: the stream's handler keeps its own idle deadline and flow control
        now = time.monotonic()
        if http.stage is not self._stage:
            self._stage, self._stage_since = http.stage, now
        limits: ConnectionLimits = self.app.ctx.connection_limits
        in_stage = now - self._stage_since
        reason = None
        if http.stage.name == "REQUEST" and in_stage > limits.header_timeout_s:
            reason = f"headers not complete within {limits.header_timeout_s:g} s"
        elif http.stage.name == "HANDLER" and http.request_body:
            allowed = limits.body_idle_timeout_s + http.request_bytes / limits.body_min_rate
            if now - self._time > limits.body_idle_timeout_s:
                reason = f"no body data for {limits.body_idle_timeout_s:g} s"
            elif in_stage > allowed:
                reason = f"body slower than {limits.body_min_rate / 1024:g} KiB/s"
        if reason is not None:
            self._time_out(reason)
            return
        if http.stage.name == "HANDLER" and not http.request_body and len(self.recv_buffer) < self.app.config.REQUEST_BUFFER_SIZE:
            self.transport.resume_reading()  # to notice a hang-up; data_received pauses again when full
        self._guard_timer = self.loop.call_later(CHECK_INTERVAL_S, self._check_deadlines)

    def _time_out(self, reason: str) -> None:
        metrics.SLOW_CLIENTS_CUT.inc()
        peer = self.transport.get_extra_info("peername") if self.transport else None
        log.info("closing a slow connection from %s: %s", peer[0] if peer else "?", reason)
        if self._http is not None and self._task is not None:
            self._http.exception = RequestTimeout(f"Request Timeout: {reason}")
            self._task.cancel()
        # If the 408 cannot be written or the client keeps the socket, drop it.
        self.loop.call_later(ABORT_AFTER_S, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.abort()
