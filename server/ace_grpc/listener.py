"""The gRPC server of an HTTP worker: ``A2FControllerService`` and the
standard health service (``grpc.health.v1``), on ``--grpc-port``, in
plaintext or TLS (the HTTP port's certificate files), every method but
health's behind the credentials check (``guard``).

It runs on the worker's own event loop, beside Sanic, and hands work to the
worker's front like the HTTP handlers. With several workers each binds the
port with SO_REUSEPORT, so the kernel spreads connections over them as it
does HTTP's; the main process has made sure the port was free before
(``server.ports``). A server without workers binds it alone: a second
server on the same port then fails to start instead of sharing it.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sanic import Sanic

from ..front import Front
from runtime.settings import Settings
from . import protocol
from .audio_stream import AudioStreamCall
from .guard import KeyGuard

log = logging.getLogger("a2e.grpc")

# How often the health service re-reads the engine's state.
HEALTH_REFRESH_S = 1.0


class A2FController(protocol.services.A2FControllerServiceServicer):
    def __init__(self, front: Front) -> None:
        self.front = front

    async def ProcessAudioStream(self, request_iterator, context):  # noqa: N802 - the protocol's name
        await AudioStreamCall(self.front, context).run()


class GrpcListener:
    def __init__(self, front: Front, host: str, port: int, max_message_bytes: int, share_port: bool, tls_files=None) -> None:
        self.front = front
        self.tls_files = tls_files  # server.tls.CertificateFiles, or None: plaintext
        self.share_port = share_port
        self.address = f"{'[::]' if host in ('0.0.0.0', '::', '') else host}:{port}"
        self.max_message_bytes = max_message_bytes
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self._refresher: asyncio.Task | None = None
        self.port = 0  # the bound port, once started

    async def start(self) -> None:
        self.server = grpc.aio.server(
            interceptors=[KeyGuard(self.front.credentials)],
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.so_reuseport", 1 if self.share_port else 0),
            ]
        )
        protocol.services.add_A2FControllerServiceServicer_to_server(A2FController(self.front), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        try:
            if self.tls_files is None:
                self.port = self.server.add_insecure_port(self.address)
            else:
                self.port = self.server.add_secure_port(self.address, self.tls_files.grpc_credentials())
        except RuntimeError as exc:
            raise OSError(f"cannot listen for gRPC on {self.address}: {exc} (--grpc-port 0 turns gRPC off)") from None
        await self.server.start()
        await self._refresh_health()
        self._refresher = asyncio.ensure_future(self._keep_health())
        log.info(
            "Audio2Face-3D gRPC API on %s:%d (%s)", self.address.rsplit(":", 1)[0], self.port,
            "plaintext" if self.tls_files is None else "mutual TLS" if self.tls_files.mutual else "TLS",
        )  # fmt: skip

    async def _refresh_health(self) -> None:
        serving = self.front.engine.ready and not self.front.draining
        state = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", protocol.SERVICE):
            await self.health.set(name, state)

    async def _keep_health(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_REFRESH_S)
            await self._refresh_health()

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, let running ones finish for ``grace_s``, then end them."""
        if self._refresher is not None:
            self._refresher.cancel()
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace_s)
            self.server = None


def serve_grpc(app: Sanic, settings: Settings, share_port: bool = False, port: int | None = None) -> None:
    """Run the gRPC API beside ``app`` while it serves (``port`` overrides
    ``settings.grpc_port``; 0 there means off). ``share_port``: one of
    several HTTP workers of one server, which share the port."""
    port = settings.grpc_port if port is None else port
    if not port:
        return

    @app.before_server_start
    async def start_grpc(app: Sanic) -> None:
        app.ctx.grpc = GrpcListener(app.ctx.front, settings.host, port, settings.max_upload_bytes, share_port, app.ctx.tls)
        await app.ctx.grpc.start()

    @app.before_server_stop
    async def stop_grpc(app: Sanic) -> None:
        await app.ctx.grpc.stop(settings.graceful_shutdown_s)
