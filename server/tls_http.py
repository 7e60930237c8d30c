"""HTTPS (and WSS) on the HTTP port: each connection's first byte decides.

A TLS ClientHello (a handshake record, byte 0x16) gets the handshake with
the certificate in force right now (``server.tls``), then Sanic's protocol
over the encrypted transport, with our connection limits
(``server.connections``) as on plain HTTP. Anything else is a client
speaking plain HTTP to a TLS port: it gets a 400 that says to use
``https://`` and is closed, where a TLS server would otherwise just drop
the connection and leave the user guessing.

The first bytes read decide, and are handed to the TLS layer (asyncio's
``SSLProtocol``, put between the transport and this protocol as
``loop.start_tls`` does), so the handshake sees the whole ClientHello; this
works the same on asyncio's loop and on uvloop. A client that sends
nothing, or never finishes the handshake, is closed after
``--header-timeout-s``.
"""

from __future__ import annotations

import asyncio
import logging
from asyncio import sslproto

from . import metrics
from .connections import ConnectionLimits, GuardedHttpProtocol

log = logging.getLogger("a2e.tls")

TLS_HANDSHAKE_RECORD = 0x16
_PLAIN_BODY = b'{"detail": "this port speaks HTTPS (TLS 1.2 or 1.3): use an https:// URL (wss:// for the WebSocket)"}'
PLAIN_HTTP_REFUSED = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: " + str(len(_PLAIN_BODY)).encode() + b"\r\n\r\n" + _PLAIN_BODY
)
LINGER_S = 2.0  # how long a refused plain-HTTP client may take to read the answer


class TlsHttpProtocol(GuardedHttpProtocol):
    """``GuardedHttpProtocol`` behind TLS when the app has certificate files
    (``app.ctx.tls``); exactly it otherwise."""

    __slots__ = ("_tls_state", "_tls_raw", "_tls_timer")

    def connection_made(self, transport) -> None:
        state = getattr(self, "_tls_state", None)
        files = getattr(self.app.ctx, "tls", None)
        if state == "handshaking":  # from the TLS layer: the handshake is done
            self._tls_state = "on"
            super().connection_made(transport)
            return
        if files is None:
            self._tls_state = "off"
            super().connection_made(transport)
            return
        self._tls_state = "sniffing"
        self._tls_raw = transport
        limits: ConnectionLimits = self.app.ctx.connection_limits
        self._tls_timer = self.loop.call_later(limits.header_timeout_s, self._nothing_sent)

    def _nothing_sent(self) -> None:
        if self._tls_state == "sniffing":
            metrics.TLS_REFUSED.labels("no_data").inc()
            self._tls_raw.abort()

    def _start_tls(self, first: bytes) -> None:
        self._tls_timer.cancel()
        if first[0] != TLS_HANDSHAKE_RECORD:
            self._refuse_plain()
            return
        limits: ConnectionLimits = self.app.ctx.connection_limits
        raw = self._tls_raw
        done = self.loop.create_future()
        done.add_done_callback(lambda f: self._handshake_done(f, raw))
        layer = sslproto.SSLProtocol(
            self.loop, self, self.app.ctx.tls.ssl_context(), done, server_side=True,
            call_connection_made=True, ssl_handshake_timeout=limits.header_timeout_s,
        )  # fmt: skip
        self._tls_state = "handshaking"
        raw.set_protocol(layer)
        layer.connection_made(raw)
        if isinstance(layer, asyncio.BufferedProtocol):  # Python 3.11 on
            buffer = layer.get_buffer(len(first))
            buffer[: len(first)] = first
            layer.buffer_updated(len(first))
        else:
            layer.data_received(first)

    @staticmethod
    def _handshake_done(done: asyncio.Future, raw: asyncio.Transport) -> None:
        exc = None if done.cancelled() else done.exception()
        if exc is None:
            return
        metrics.TLS_REFUSED.labels("handshake").inc()
        peer = raw.get_extra_info("peername")
        log.info("TLS handshake with %s failed: %s", peer[0] if peer else "?", getattr(exc, "reason", None) or exc)

    def _refuse_plain(self) -> None:
        metrics.TLS_REFUSED.labels("plain_http").inc()
        self._tls_state = "refused"
        raw = self._tls_raw
        raw.write(PLAIN_HTTP_REFUSED)
        # Read on (and drop) the rest of the request: closing on unread data
        # resets the connection, which can destroy the answer before it is read.
        try:
            raw.write_eof()
        except (OSError, RuntimeError):
            pass
        self.loop.call_later(LINGER_S, raw.abort)

    def data_received(self, data: bytes) -> None:
        state = self._tls_state
        if state == "sniffing":
            if data:
                self._start_tls(data)
        elif state != "refused":
            super().data_received(data)

    def eof_received(self):
        if self._tls_state in ("off", "on"):
            return super().eof_received()
        return False  # close

    def connection_lost(self, exc) -> None:
        state = getattr(self, "_tls_state", "off")
        if state in ("off", "on"):
            super().connection_lost(exc)
        elif state == "sniffing":
            self._tls_timer.cancel()
