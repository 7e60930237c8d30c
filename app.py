"""LAM-A2E inference server: the Sanic application and its entry point.

    python app.py [--host 0.0.0.0] [--port 8000] [--config-file ...] [--weight ...]

It composes the rooms (README, "How it is built"): the settings
(``runtime``), the engines (``engine``: an ``InferenceService`` in this
process with ``--workers 0``, else one engine process per device behind an
``EnginePool``) and the front doors (``server``: REST, WebSocket and gRPC),
and maps every error to its answer.

Every client mistake is a 4xx with its reason; only our own faults are 500,
and those carry a request id (also in the log), never the exception text.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import sys
import socket
import time
from collections.abc import Sequence

from sanic import Sanic
from sanic.exceptions import PayloadTooLarge, RequestCancelled, SanicException
from sanic.request import Request
from sanic.response import HTTPResponse

from a2e.errors import A2EError, CheckpointError
from batching import Cancelled
from engine.client import EnginePool, RemoteError
from engine.protocol import Engine
from server import access, metrics, responses, tls
from server.connections import (
    BoundedRequest,
    ConnectionLimits,
    UploadBudget,
    max_connections_allowed,
    raise_open_files_limit,
    release_upload,
)
from server.credentials import Credentials
from server.forms import RequestError
from server.tls_http import TlsHttpProtocol
from server.routes import bp
from server.stream_socket import bp as stream_bp
from server.ace_grpc.listener import serve_grpc
from server.demo_page import bp as demo_bp
from server.openapi import bp as openapi_bp
from server.ports import check_free
from server.statuses import status_of
from server.stopping import StoppableSanic, stop_manager_whenever_asked
from server.front import Front
from runtime.heap import freeze_startup_objects
from runtime.logs import configure_logging
from runtime.settings import Settings, load_settings

log = logging.getLogger("a2e.server")
access_log = logging.getLogger("a2e.access")
_app_ids = itertools.count()
EXPIRY_INTERVAL_S = 5.0


# nginx's status for a request whose client closed the connection first;
# never sent (nobody is listening), but it keeps disconnects out of the 5xx.
CLIENT_CLOSED = 499


def _endpoint(request: Request) -> str:
    route = request.route.path if request.route else "unmatched"
    return "/" + route.lstrip("/") if route != "unmatched" else route


def _request_id(request: Request) -> str:
    try:
        return str(request.id)
    except Exception:  # an empty request made up for a malformed head
        return "-"


def _header_error(request: Request) -> HTTPResponse:
    """431 for oversized headers; 414 when the request line alone is too long."""
    limit = request.app.config.REQUEST_MAX_HEADER_SIZE
    buffer = getattr(getattr(request, "stream", None), "recv_buffer", b"") or b""
    line_end = bytes(buffer[: limit + 2]).find(b"\r\n")
    if line_end == -1 or line_end >= limit:
        return responses.error(414, f"URL too long: the request line is limited to {limit} bytes")
    return responses.error(431, f"request headers too large: they are limited to {limit} bytes in all")


def _error_response(request: Request, exc: Exception) -> HTTPResponse:
    release_upload(request)
    if isinstance(exc, (RequestCancelled, Cancelled)):
        metrics.CLIENT_DISCONNECTS.labels(_endpoint(request)).inc()
        log.info("client went away before the answer: %s %s (request %s)", request.method, request.path, _request_id(request))
        return responses.error(CLIENT_CLOSED, "client closed the connection")
    if isinstance(exc, RemoteError):  # the engine logged its traceback; this line ties it to the request
        return _internal_error(request, exc, exc_info=False)
    known = status_of(exc)
    if known is not None:
        return responses.error(*known)
    if isinstance(exc, PayloadTooLarge) and "header" in str(exc).lower():
        return _header_error(request)
    if isinstance(exc, SanicException):
        status = getattr(exc, "status_code", 500)
        message = str(exc) or getattr(exc, "message", "") or "error"
        if status == 413:
            limit = request.app.ctx.front.settings.max_upload_mb
            message = f"request body too large: the limit is {limit:g} MB"
        if status == 503 and message == "Response Timeout":  # Sanic's, at --response-timeout-s
            limit = request.app.ctx.front.settings.response_timeout_s
            return responses.error(503, f"the answer took longer than {limit:g} s (--response-timeout-s): the server is "
                                        "overloaded; retry later", {"Retry-After": "5"})  # fmt: skip
        if status < 500 or status == 503:
            return responses.error(status, message, getattr(exc, "headers", None))
    return _internal_error(request, exc, exc_info=True)


def _internal_error(request: Request, exc: Exception, exc_info: bool) -> HTTPResponse:
    """Our fault: the details go to the log under the request id, the client gets the id only."""
    request_id = _request_id(request)
    log.error(
        "internal error on %s %s (request %s): %s: %s",
        request.method,
        request.path,
        request_id,
        type(exc).__name__,
        exc,
        exc_info=exc if exc_info else None,
    )
    return responses.error(500, f"internal error (request id {request_id}); the server log has the details")


def create_app(settings: Settings, engine: Engine | None = None, early_stop: Sequence[int] = ()) -> Sanic:
    """The Sanic app for ``settings``, handing work to ``engine``: an
    InferenceService in this process (made and loaded at start when not
    given) or an EnginePool of engine processes. ``early_stop``: signals
    this process received before serving (it stops once serving)."""
    app = StoppableSanic(f"lam_a2e_{next(_app_ids)}", configure_logging=False, request_class=BoundedRequest)
    app.stop_whenever_asked(early_stop)
    app.config.REQUEST_MAX_SIZE = settings.max_upload_bytes
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.KEEP_ALIVE_TIMEOUT = settings.keep_alive_timeout_s
    app.config.REQUEST_TIMEOUT = settings.header_timeout_s
    app.config.RESPONSE_TIMEOUT = settings.response_timeout_s
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = settings.graceful_shutdown_s
    app.ctx.connection_limits = ConnectionLimits(
        max_connections=max_connections_allowed(settings.max_connections),
        header_timeout_s=settings.header_timeout_s,
        body_idle_timeout_s=settings.body_idle_timeout_s,
        body_min_rate=settings.body_min_rate_kb * 1024,
    )
    app.ctx.upload_budget = UploadBudget(int(settings.upload_memory_mb * 1024 * 1024))
    # Whoever creates the engine closes it: the app only when it made it.
    app.ctx.owns_engine = engine is None
    if engine is None:
        from engine.service import InferenceService  # the model side (torch): never imported by HTTP workers

        engine = InferenceService(settings)
    app.ctx.front = Front(settings, engine)
    app.ctx.tls = tls.CertificateFiles.from_settings(settings)  # None: plain HTTP (server.tls_http)
    app.blueprint(bp)
    app.blueprint(stream_bp)
    app.blueprint(demo_bp)
    app.blueprint(openapi_bp)
    app.error_handler.add(Exception, _error_response)
    # A client that hangs up: Sanic's RequestCancelled is a CancelledError, not an Exception.
    app.error_handler.add(RequestCancelled, _error_response)

    @app.before_server_start
    async def start_engine(app: Sanic) -> None:
        front: Front = app.ctx.front
        front.accept_work()
        if isinstance(front.engine, EnginePool):
            await front.engine.connect()  # engine processes, started by the main process
            return
        svc = front.engine
        svc.accept_work()
        loop = asyncio.get_running_loop()
        if not svc.load_attempted:
            await loop.run_in_executor(None, svc.load)
        if settings.separation_preload:
            await loop.run_in_executor(None, svc.preload_separator)
        # Our own task, not app.add_task: Sanic warns about its tasks when it cancels them at shutdown.
        app.ctx.expiry = asyncio.ensure_future(_expire_sessions(svc))

    @app.before_server_start
    async def watch_keys(app: Sanic) -> None:
        app.ctx.key_watch = asyncio.ensure_future(app.ctx.front.credentials.watch())

    @app.after_server_start
    async def settle(app: Sanic) -> None:
        freeze_startup_objects()  # (an HTTP worker too: sanic, grpc and numpy are many objects)

    @app.before_server_stop
    async def drain(app: Sanic) -> None:
        if app.asgi:
            return  # an ASGI server owns connections and their draining (and runs this per request in tests)
        app.ctx.front.begin_drain(settings.graceful_shutdown_s)
        if not isinstance(app.ctx.front.engine, EnginePool):
            app.ctx.front.engine.begin_drain()

    @app.after_server_stop
    async def shutdown(app: Sanic) -> None:
        front: Front = app.ctx.front
        for task in (getattr(app.ctx, "expiry", None), getattr(app.ctx, "key_watch", None)):
            if task is not None:
                task.cancel()
        front.close()
        if isinstance(front.engine, EnginePool):
            await front.engine.disconnect()
        elif app.ctx.owns_engine:
            front.engine.close()

    node_name = f"{socket.gethostname()}:{settings.port}"

    @app.on_request
    async def start_timer(request: Request) -> HTTPResponse | None:
        request.ctx.started = time.perf_counter()
        # Sanic's own server enforces REQUEST_MAX_SIZE while reading; ASGI
        # servers may not, so the limit is checked here too.
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > settings.max_upload_bytes:
            raise RequestError(413, f"request body too large: the limit is {settings.max_upload_mb:g} MB")
        request.ctx.cors_origin = access.allowed_origin(request, settings.cors_origin_list)
        # Also runs for routing errors (Sanic runs request middleware before
        # answering them), which is how a preflight of a POST-only path is answered.
        if request.method == "OPTIONS" and request.ctx.cors_origin is not None:
            return access.preflight(request.ctx.cors_origin)
        request.ctx.caller = access.authenticate(request, request.app.ctx.front.credentials)
        return None

    @app.on_response
    async def record(request: Request, response: HTTPResponse) -> None:
        release_upload(request)
        stream = getattr(request, "stream", None)
        if getattr(stream, "expecting_continue", False):
            # Answered before the body was asked for (413, 401, 503...): no
            # "100 Continue" ahead of it, so the client does not send the
            # body for nothing; and the connection closes, as the body never comes.
            stream.expecting_continue = False
            stream.keep_alive = False
        request_id = _request_id(request)
        access.decorate(response, request_id, getattr(request.ctx, "cors_origin", None))
        response.headers["X-A2E-Node"] = node_name  # which node answered, behind a balancer
        endpoint = _endpoint(request)
        metrics.REQUESTS.labels(endpoint, request.method, str(response.status)).inc()
        caller = getattr(request.ctx, "caller", None)
        if caller is not None and caller.name is not None:
            metrics.CALLER_REQUESTS.labels(caller.name, "websocket" if endpoint == "/api/stream" else "rest").inc()
        elif response.status == 401:
            metrics.AUTH_REFUSED.labels("http").inc()
        started = getattr(request.ctx, "started", None)
        seconds = time.perf_counter() - started if started is not None else None
        if seconds is not None:
            metrics.LATENCY.labels(endpoint, request.method).observe(seconds)
        if access_log.isEnabledFor(logging.INFO):
            message, fields = access.access_line(request, response, request_id, seconds)
            access_log.info(message, extra={"fields": fields})


    return app


async def _expire_sessions(service) -> None:
    while True:
        await service.check_state()
        await asyncio.sleep(EXPIRY_INTERVAL_S)
        service.expire_sessions()


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except A2EError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    raise_open_files_limit()  # before any worker or engine starts: they inherit it
    try:
        # Keys and certificates that cannot be used stop start-up here, naming the file.
        Credentials.from_settings(settings)
        tls.check(settings)
        if settings.shared_state:  # a Sentinel without the service, a server that is no cluster node: said now
            from engine.redis_connect import check_address

            check_address(settings.state)
        # Another server on our ports: said at once, before anything is loaded or downloaded.
        check_free(settings.host, settings.port, "HTTP", "--port")
        check_free(settings.host, settings.grpc_port, "Audio2Face-3D gRPC", "--grpc-port (0 turns gRPC off)")
        from engine.loading import fetch_hub_weights  # torch: the main process only, never an HTTP worker's import

        # hf:// weights: fetched once here, before any engine starts (a
        # SIGTERM meanwhile stops the download at once; it resumes next time).
        settings = fetch_hub_weights(settings)
    except A2EError as exc:
        log.error("cannot start: %s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Sanic installs its SIGTERM handler only once serving; a SIGTERM before
    # that (loading, starting engines, binding) would kill the process
    # outright. Until then, note it and stop cleanly as soon as possible.
    early_stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: early_stop.append(signum))
    if settings.worker_count > 0:
        return _serve_with_engines(settings, early_stop)
    from engine.service import InferenceService

    service = InferenceService(settings)
    try:
        service.load()  # before binding, so a bad checkpoint stops start-up with its reason
    except (CheckpointError, A2EError) as exc:
        log.error("cannot start: %s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings, service, early_stop)
    serve_grpc(app, settings)

    @app.after_server_start
    async def say_where(app: Sanic) -> None:
        host = "localhost" if settings.host in ("0.0.0.0", "::") else settings.host
        log.info(
            "serving on %s://%s:%d (one process; model %s)%s", "https" if settings.tls else "http", host, settings.port,
            service.stats()["model"]["name"],
            f"; Audio2Face-3D gRPC on port {settings.grpc_port}" if settings.grpc_port else "",
        )  # fmt: skip
    app.run(
        host=settings.host,
        port=settings.port,
        single_process=True,
        access_log=False,  # ours (a2e.access) carries the fields
        motd=False,
        protocol=TlsHttpProtocol,
    )
    service.close()
    return 0


def worker_app(settings: Settings, engine_paths: list[str]) -> Sanic:
    """The app of one HTTP worker process: it reaches the engines through their sockets."""
    configure_logging(settings.log_level)
    app = create_app(settings, EnginePool(settings, engine_paths))
    serve_grpc(app, settings, share_port=True)  # the main process checked the port was free
    return app


def _serve_with_engines(settings: Settings, early_stop: list[int]) -> int:
    """--workers N: engine processes (one per device) and N HTTP worker processes."""
    import functools
    import tempfile
    import threading

    from sanic.worker.loader import AppLoader

    from engine.supervisor import EngineStartError, EngineSupervisor, watch_workers

    import multiprocessing

    # Sanic's workers and our engines both start by spawning (a forked CUDA
    # context is unusable); set it before anything fixes the default.
    multiprocessing.set_start_method("spawn", force=True)
    Sanic.START_METHOD_SET = True  # done above; Sanic would refuse a method already set
    # One /metrics view over all processes: each writes its samples here.
    metrics_dir = os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="a2e-metrics-"))
    supervisor = EngineSupervisor(settings)
    try:
        supervisor.start()
    except (EngineStartError, A2EError) as exc:
        supervisor.stop()
        log.error("cannot start: %s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if early_stop:
        log.info("SIGTERM received during start-up: stopping")
        supervisor.stop()
        return 0
    loader = AppLoader(factory=functools.partial(worker_app, settings, supervisor.paths))
    app = loader.load()
    app.prepare(
        host=settings.host,
        port=settings.port,
        workers=settings.worker_count,
        access_log=False,  # ours (a2e.access) carries the fields
        motd=False,
        protocol=TlsHttpProtocol,
    )
    stopping = threading.Event()

    @app.main_process_ready
    async def supervise(app: Sanic) -> None:
        watch_workers(app, stopping)
        stop_manager_whenever_asked(app.manager, early_stop)

    @app.main_process_stop
    async def stop_supervising(app: Sanic) -> None:
        stopping.set()

    log.info(
        "serving on %s://%s:%d with %d HTTP workers and %d engines (%s); metrics in %s",
        "https" if settings.tls else "http", settings.host, settings.port, settings.worker_count, len(supervisor.paths), ", ".join(supervisor.devices), metrics_dir,
    )  # fmt: skip
    try:
        Sanic.serve(primary=app, app_loader=loader)
    finally:
        stopping.set()
        supervisor.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
