"""LAM-A2E inference server: the Sanic application and its entry point.

    python app.py [--host 0.0.0.0] [--port 8000] [--config-file ...] [--weight ...]

One process owns the model and the device (Sanic runs single-process):
handlers hand work to the micro-batcher thread and await it. See README.md.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import time

from sanic import Sanic
from sanic.exceptions import SanicException
from sanic.request import Request
from sanic.response import HTTPResponse

from a2e.errors import A2EError, AudioError, AudioTooLongError, CheckpointError
from a2e.separation import SeparationUnavailable
from batching import BatcherStopped, QueueFull
from server import metrics, responses
from server.forms import RequestError
from server.logs import configure_logging
from server.routes import bp
from server.service import InferenceService, SeparationBusy
from server.sessions import SessionLimitReached
from server.settings import Settings, load_settings

log = logging.getLogger("a2e.server")
_app_ids = itertools.count()
EXPIRY_INTERVAL_S = 5.0


def _error_response(request: Request, exc: Exception) -> HTTPResponse:
    if isinstance(exc, RequestError):
        return responses.error(exc.status, exc.detail, exc.headers)
    if isinstance(exc, AudioTooLongError):
        return responses.error(413, str(exc))
    if isinstance(exc, AudioError):
        return responses.error(400, f"Invalid audio: {exc}")
    if isinstance(exc, QueueFull):
        return responses.error(503, str(exc), {"Retry-After": str(int(exc.retry_after_s + 0.999))})
    if isinstance(exc, SessionLimitReached):
        return responses.error(429, str(exc), {"Retry-After": "5"})
    if isinstance(exc, SeparationUnavailable):
        return responses.error(503, f"vocal isolation (ex_vol=true) is unavailable: {exc}", {"Retry-After": "300"})
    if isinstance(exc, SeparationBusy):
        return responses.error(503, str(exc), {"Retry-After": "10"})
    if isinstance(exc, BatcherStopped):
        return responses.error(503, f"Model not loaded: {exc}")
    if isinstance(exc, SanicException):
        status = getattr(exc, "status_code", 500)
        message = str(exc) or getattr(exc, "message", "") or "error"
        if status == 413:
            limit = request.app.ctx.service.settings.max_upload_mb
            message = f"request body too large: the limit is {limit:g} MB"
        return responses.error(status, message, getattr(exc, "headers", None))
    log.exception("internal error on %s %s", request.method, request.path)
    return responses.error(500, f"Inference failed: {type(exc).__name__}: {exc}")


def create_app(settings: Settings, service: InferenceService | None = None) -> Sanic:
    """The Sanic app for ``settings``; the model loads when the server starts."""
    app = Sanic(f"lam_a2e_{next(_app_ids)}", configure_logging=False)
    app.config.REQUEST_MAX_SIZE = settings.max_upload_bytes
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.KEEP_ALIVE_TIMEOUT = 30
    # Whoever creates the service closes it: the app only when it made it.
    app.ctx.owns_service = service is None
    app.ctx.service = service or InferenceService(settings)
    app.blueprint(bp)
    app.error_handler.add(Exception, _error_response)

    @app.before_server_start
    async def load_model(app: Sanic) -> None:
        svc: InferenceService = app.ctx.service
        loop = asyncio.get_running_loop()
        if not svc.ready:
            await loop.run_in_executor(None, svc.load)
        if settings.separation_preload:
            await loop.run_in_executor(None, svc.preload_separator)
        app.add_task(_expire_sessions(svc), name="expire_sessions")

    @app.after_server_stop
    async def shutdown(app: Sanic) -> None:
        if app.ctx.owns_service:
            app.ctx.service.close()

    @app.on_request
    async def start_timer(request: Request) -> None:
        request.ctx.started = time.perf_counter()
        # Sanic's own server enforces REQUEST_MAX_SIZE while reading; ASGI
        # servers may not, so the limit is checked here too.
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > settings.max_upload_bytes:
            raise RequestError(413, f"request body too large: the limit is {settings.max_upload_mb:g} MB")

    @app.on_response
    async def record(request: Request, response: HTTPResponse) -> None:
        route = request.route.path if request.route else "unmatched"
        endpoint = "/" + route.lstrip("/") if route != "unmatched" else route
        metrics.REQUESTS.labels(endpoint, request.method, str(response.status)).inc()
        started = getattr(request.ctx, "started", None)
        if started is not None:
            metrics.LATENCY.labels(endpoint, request.method).observe(time.perf_counter() - started)

    return app


async def _expire_sessions(service: InferenceService) -> None:
    while True:
        await asyncio.sleep(EXPIRY_INTERVAL_S)
        service.expire_sessions()


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except A2EError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    service = InferenceService(settings)
    try:
        service.load()  # before binding, so a bad checkpoint stops start-up with its reason
    except (CheckpointError, A2EError) as exc:
        log.error("cannot start: %s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings, service)
    app.run(
        host=settings.host,
        port=settings.port,
        single_process=True,
        access_log=settings.log_level.lower() in ("debug", "trace"),
        motd=False,
    )
    service.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
