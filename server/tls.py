"""TLS material for the front doors: the server's certificate and key
(``--tls-cert``, ``--tls-key``) and the CA that client certificates must be
signed by (``--tls-client-ca``), as an ``ssl.SSLContext`` for HTTP and
WebSocket and as gRPC server credentials, both following the files.

Policy: TLS 1.2 and 1.3 only; for TLS 1.2 only forward-secret AEAD suites
(ECDHE with AES-GCM or ChaCha20-Poly1305), no compression, no renegotiation.
gRPC's own defaults are the same (TLS 1.2 at least, ECDHE with AES-GCM).

The one idea: a renewed certificate (cert-manager, certbot, a copied file)
is picked up without a restart. New connections and handshakes look at the
files at most once a second and switch to a new context when they changed;
connections already open keep the one they were made with, so no stream
drops. A renewal caught half-written keeps the old material until both
files fit together again (logged).

It does not accept connections (``server.tls_http`` and the gRPC listener
do) and knows nothing of API keys.
"""

from __future__ import annotations

import datetime
import logging
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from a2e.errors import ConfigError
from runtime.settings import Settings

log = logging.getLogger("a2e.tls")

RECHECK_S = 1.0
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


@dataclass(frozen=True)
class _Material:
    cert: bytes
    key: bytes
    client_ca: bytes | None
    stamp: tuple


def _stamp(paths: list[Path]) -> tuple:
    out = []
    for p in paths:
        st = p.stat()
        out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def _read(path: Path, what: str, flag: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} ({flag}) does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path} ({flag}): {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{what} {path} ({flag}) is not PEM (no '-----BEGIN' line)")
    return data


def _context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """An HTTP server context of our policy; ConfigError naming the file and the problem."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in reason.upper() or "mismatch" in reason.lower():
            raise ConfigError(f"the key {key} (--tls-key) does not match the certificate {cert} (--tls-cert)") from None
        raise ConfigError(f"cannot load the certificate {cert} (--tls-cert) with the key {key} (--tls-key): {reason}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {cert} (--tls-cert) or {key} (--tls-key): {exc.strerror or exc}") from None
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(client_ca))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"cannot load the client CA {client_ca} (--tls-client-ca): {getattr(exc, 'reason', None) or exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _warn_if_outdated(cert: bytes, path: Path) -> None:
    """A server certificate out of its validity period fails every client with
    an obscure message; say so at start-up and on every renewal."""
    try:
        from cryptography import x509  # optional: only for this warning
    except ImportError:
        return
    try:
        parsed = x509.load_pem_x509_certificate(cert)
    except ValueError:
        return  # ssl already accepted it; nothing more to say
    now = datetime.datetime.now(datetime.timezone.utc)
    if parsed.not_valid_after_utc < now:
        log.warning("the TLS certificate %s expired on %s: clients will refuse it", path, parsed.not_valid_after_utc)
    elif parsed.not_valid_before_utc > now:
        log.warning("the TLS certificate %s is not valid before %s: clients will refuse it", path, parsed.not_valid_before_utc)


class CertificateFiles:
    """The TLS files of one server, read again when they change."""

    def __init__(self, cert: str, key: str, client_ca: str | None) -> None:
        self.cert, self.key = Path(cert), Path(key)
        self.client_ca = Path(client_ca) if client_ca else None
        self._lock = threading.Lock()  # gRPC asks from its own threads
        self._checked = time.monotonic()
        self._failed_stamp: tuple | None = None
        self._material = self._load()
        self._ssl = _context(self.cert, self.key, self.client_ca)
        self._grpc_seen = self._material.stamp
        _warn_if_outdated(self._material.cert, self.cert)

    @classmethod
    def from_settings(cls, settings: Settings) -> "CertificateFiles | None":
        if not settings.tls:
            return None
        return cls(settings.tls_cert, settings.tls_key, settings.tls_client_ca)

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def _paths(self) -> list[Path]:
        return [self.cert, self.key] + ([self.client_ca] if self.client_ca else [])

    def _load(self) -> _Material:
        try:
            stamp = _stamp(self._paths())
        except OSError:
            stamp = ()
        ca = _read(self.client_ca, "client CA", "--tls-client-ca") if self.client_ca else None
        return _Material(_read(self.cert, "certificate", "--tls-cert"), _read(self.key, "key", "--tls-key"), ca, stamp)

    def _refresh(self) -> None:
        """Switch to the files on disk if they changed and fit together (lock held)."""
        now = time.monotonic()
        if now - self._checked < RECHECK_S:
            return
        self._checked = now
        try:
            stamp = _stamp(self._paths())
        except OSError:
            return  # a file is being replaced: keep what works
        if stamp in (self._material.stamp, self._failed_stamp):
            return
        try:
            material = self._load()
            context = _context(self.cert, self.key, self.client_ca)
        except ConfigError as exc:
            self._failed_stamp = stamp
            log.error("TLS files changed but cannot be used yet (the previous certificate stays in use): %s", exc)
            return
        self._material, self._ssl, self._failed_stamp = material, context, None
        _warn_if_outdated(material.cert, self.cert)
        log.info("TLS certificate %s re-read: new connections use it", self.cert)

    def ssl_context(self) -> ssl.SSLContext:
        """The context for a new HTTP connection."""
        with self._lock:
            self._refresh()
            return self._ssl

    def grpc_credentials(self) -> Any:
        """gRPC server credentials that follow the files (asked at each handshake)."""
        import grpc

        def configuration(material: _Material) -> Any:
            return grpc.ssl_server_certificate_configuration([(material.key, material.cert)], material.client_ca)

        def fetch() -> Any:
            with self._lock:
                self._refresh()
                if self._material.stamp == self._grpc_seen:
                    return None  # unchanged: gRPC keeps the configuration it has
                self._grpc_seen = self._material.stamp
                return configuration(self._material)

        return grpc.dynamic_ssl_server_credentials(configuration(self._material), fetch, self.mutual)


def peer_name(transport: Any) -> str | None:
    """The common name of the client certificate that this TLS connection verified."""
    if transport is None:
        return None
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def check(settings: Settings) -> None:
    """Start-up: the TLS files can be read and fit together, or ConfigError names the file and the problem."""
    if settings.tls:
        CertificateFiles.from_settings(settings)

