"""Who may call over HTTP, and from where: the credentials a request shows
(checked by ``server.credentials``, as on every door), the cross-origin
(CORS) policy, and the headers every response carries.

Browsers send multipart POSTs and ``text/plain`` bodies across origins
without asking first, so leaving out CORS headers is not enough to keep
other web sites from using the server through a visitor's browser: a request
from a foreign ``Origin`` is refused (403) unless the operator listed it.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from sanic.request import Request
from sanic.response import HTTPResponse

from . import tls
from .credentials import HOW_BROWSER, HOW_HTTP, Caller, Credentials, Unauthenticated, bearer
from .forms import RequestError

# Reachable without the API key: monitoring must work without secrets.
OPEN_PATHS = frozenset({"/api/health", "/metrics", "/openapi.json", "/docs"})
# The demo page's own files hold no data: the calls the page makes carry the key.
OPEN_PREFIX = "/demo"
STREAM_PATH = "/api/stream"
BROWSER_SUBPROTOCOL = "a2e"  # what the server answers a browser that offers it with a key
KEY_SUBPROTOCOL = "a2e-key."  # a WebSocket subprotocol carrying the key
ALLOWED_HEADERS = "Content-Type, Authorization, X-API-Key, X-Request-ID"
ALLOWED_METHODS = "GET, POST, DELETE, OPTIONS"
PREFLIGHT_MAX_AGE_S = 600


def presented_key(request: Request) -> str | None:
    """The API key a request carries: ``X-API-Key``, ``Authorization: Bearer``,
    or (browsers cannot set headers on a WebSocket) the subprotocol ``a2e-key.KEY``."""
    given = request.headers.get("x-api-key") or bearer(request.headers.get("authorization"))
    if given is None and "sec-websocket-protocol" in request.headers:
        for offered in request.headers["sec-websocket-protocol"].split(","):
            offered = offered.strip()
            if offered.startswith(KEY_SUBPROTOCOL):
                return offered[len(KEY_SUBPROTOCOL) :]
    return given


def authenticate(request: Request, credentials: Credentials) -> Caller:
    """The request's caller (``server.credentials``); 401 when it shows no key this server accepts."""
    address = request.remote_addr or request.ip or "unknown"
    if not credentials.required or request.path in OPEN_PATHS or request.path.startswith(OPEN_PREFIX) or request.method == "OPTIONS":
        return Caller(None, address)
    how = HOW_HTTP + (f", or {HOW_BROWSER}" if request.path == STREAM_PATH else "")
    try:
        return credentials.identify(presented_key(request), tls.peer_name(request.transport), address, how)
    except Unauthenticated as exc:
        raise RequestError(401, exc.detail, {"WWW-Authenticate": 'Bearer realm="lam-a2e"'}) from None


def _same_origin(request: Request, origin: str) -> bool:
    host = request.headers.get("host", "")
    return bool(host) and urlsplit(origin).netloc.lower() == host.lower()


def allowed_origin(request: Request, allowed: tuple[str, ...]) -> str | None:
    """The request's Origin when it is a cross-origin request the operator allows.

    Raises 403 for a cross-origin request that is not allowed; returns None for
    same-origin and non-browser requests (no Origin header)."""
    origin = request.headers.get("origin")
    if not origin or _same_origin(request, origin):
        return None
    if "*" in allowed or origin.rstrip("/") in allowed:
        return origin
    raise RequestError(
        403,
        f"cross-origin requests from {origin} are not allowed; the operator can allow origins with --cors-origins",
    )


def preflight(origin: str) -> HTTPResponse:
    return HTTPResponse(
        status=204,
        headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": ALLOWED_METHODS,
            "Access-Control-Allow-Headers": ALLOWED_HEADERS,
            "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
            "Vary": "Origin",
        },
    )


def decorate(response: HTTPResponse, request_id: str, origin: str | None) -> None:
    """Headers on every response: no MIME sniffing, the request id, CORS when allowed."""
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Request-ID"] = request_id
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "X-Request-ID, Retry-After"
        response.headers["Vary"] = "Origin"


def access_line(request: Request, response: HTTPResponse, request_id: str, seconds: float | None) -> tuple[str, dict]:
    """One access log line: a readable message and its fields (server/logs.py
    writes them as JSON keys). Errors carry their reason."""
    size = len(response.body) if response.body is not None else 0
    fields: dict = {
        "method": request.method,
        "path": request.path,
        "status": response.status,
        "duration_ms": round(seconds * 1000, 2) if seconds is not None else None,
        "bytes_in": len(request.body or b""),
        "bytes_out": size,
        "request_id": request_id,
        "client": request.ip,
    }
    caller = getattr(request.ctx, "caller", None)
    if caller is not None and caller.name is not None:
        fields["client_key"] = caller.name  # the key's name, never the key
    session = getattr(request.ctx, "session_id", None)
    if session:
        fields["session_id"] = session
    if response.status >= 400 and response.body and size < 4096:
        try:
            fields["error"] = json.loads(response.body).get("detail")
        except (ValueError, AttributeError):
            pass
    took = f" {fields['duration_ms']:.1f} ms" if seconds is not None else ""
    return f"{request.method} {request.path} {response.status}{took} {size} B", fields
