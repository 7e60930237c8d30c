"""Who is calling: the one check of credentials that every front door (REST,
WebSocket, gRPC, the demo page's calls) goes through.

A caller shows an API key (the one ``--api-key``, or a named key of
``--api-keys-file``), or, where the operator says a client certificate is
enough (``--tls-client-cert-is-key``), the certificate that mutual TLS
already verified. The result is a ``Caller``: the name that access logs and
metrics show (never the key), and the client that ``--max-sessions-per-client``
counts: the key's name where keys are per client, the address otherwise.

It does not read requests, metadata or certificates (each door hands it the
key and the certificate's name it found) and it does not answer anyone: a
refusal is ``Unauthenticated``, which each door turns into its own 401.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass

from runtime.settings import Settings

from .api_keys import RELOAD_INTERVAL_S, KeyRing

log = logging.getLogger("a2e.credentials")

SINGLE_KEY_NAME = "api-key"  # the name --api-key's callers get in logs and metrics
HOW_HTTP = "send it as 'X-API-Key: KEY' or 'Authorization: Bearer KEY'"
HOW_GRPC = "send it as gRPC metadata 'x-api-key: KEY' or 'authorization: Bearer KEY'"
HOW_BROWSER = "from a browser, offer the WebSocket subprotocols 'a2e' and 'a2e-key.KEY'"


class Unauthenticated(Exception):
    """No credentials, or none this server accepts; ``detail`` says how to send them."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True)
class Caller:
    name: str | None  # the key's name, "cert:CN", or None where no credentials are asked for
    client: str  # what per-client limits count
    generation: int = 0  # the keys' generation when this caller was checked


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` value."""
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


class Credentials:
    def __init__(self, api_key: str | None, ring: KeyRing | None, cert_is_key: bool) -> None:
        self.api_key = api_key
        self.ring = ring
        self.cert_is_key = cert_is_key

    @classmethod
    def from_settings(cls, settings: Settings) -> "Credentials":
        """ConfigError (naming the file) when the keys file cannot be read."""
        ring = KeyRing(settings.api_keys_file) if settings.api_keys_file else None
        return cls(settings.api_key, ring, settings.tls_client_cert_is_key)

    @property
    def required(self) -> bool:
        return bool(self.api_key) or self.ring is not None or self.cert_is_key

    @property
    def generation(self) -> int:
        return self.ring.generation if self.ring is not None else 0

    def identify(self, key: str | None, cert_name: str | None, address: str, how: str = HOW_HTTP) -> Caller:
        """The caller showing ``key`` (or None) over a connection whose verified
        client certificate is named ``cert_name`` (or None), from ``address``."""
        if not self.required:
            return Caller(None, address)
        if key:
            if self.ring is not None and (name := self.ring.name_of(key)) is not None:
                return Caller(name, "key:" + name, self.generation)
            if self.api_key and hmac.compare_digest(key.encode(), self.api_key.encode()):
                return Caller(SINGLE_KEY_NAME, address, self.generation)  # one key for all: counted per address
            raise Unauthenticated(f"wrong or revoked API key: {how}")
        if self.cert_is_key and cert_name is not None:
            return Caller("cert:" + cert_name, "cert:" + cert_name, self.generation)
        if self.api_key or self.ring is not None:
            raise Unauthenticated(f"missing API key: {how}")
        raise Unauthenticated("a client certificate signed by the server's --tls-client-ca is required")

    def recheck(self, caller: Caller) -> Caller:
        """A stream's caller, checked again if the keys changed since it was
        (one comparison otherwise); Unauthenticated once its key is revoked."""
        if caller.generation == self.generation or self.ring is None or caller.name is None:
            return caller
        if caller.client.startswith("key:") and caller.name not in self.ring.names:
            raise Unauthenticated(f"the API key {caller.name!r} was revoked")
        return Caller(caller.name, caller.client, self.generation)

    async def watch(self) -> None:
        """Re-read the keys file whenever it changes (run as a task while serving)."""
        if self.ring is None:
            return
        while True:
            await asyncio.sleep(RELOAD_INTERVAL_S)
            self.ring.refresh()
