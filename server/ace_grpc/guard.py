"""The gRPC door's check of credentials: an interceptor in front of every
method of every service, but the standard health service, which stays
open as ``/api/health`` does.

A call shows its key as metadata, ``x-api-key: KEY`` or ``authorization:
Bearer KEY``; with mutual TLS and ``--tls-client-cert-is-key`` its verified
certificate is enough. Without, the call ends ``UNAUTHENTICATED`` (with how
to send the key) before the method runs, so no audio of it is read. The
check itself is ``server.credentials``'s, as on every door; the caller it
finds is handed to the method through ``CALLER``.

Wrapping the handlers (rather than checking in each method) means a method
added later is guarded without anyone remembering to.
"""

from __future__ import annotations

import contextvars
import inspect

import grpc

from .. import metrics
from ..credentials import HOW_GRPC, Caller, Credentials, Unauthenticated, bearer

OPEN_SERVICES = ("/grpc.health.v1.Health/",)
# The caller of the call running in this task (set by the guard before the method runs).
CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("a2e_grpc_caller", default=None)


def _metadata_key(context: grpc.aio.ServicerContext) -> str | None:
    found = None
    for key, value in context.invocation_metadata() or ():
        if key == "x-api-key":
            return value if isinstance(value, str) else None
        if key == "authorization" and found is None:
            found = bearer(value if isinstance(value, str) else None)
    return found


def _cert_name(context: grpc.aio.ServicerContext) -> str | None:
    names = context.auth_context().get("x509_common_name") or ()
    return names[0].decode(errors="replace") if names else None


def peer_host(peer: str) -> str:
    """The client's address from gRPC's ``ipv4:1.2.3.4:5678`` / ``ipv6:[::1]:5678``."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1 : rest.find("]")]
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer


class KeyGuard(grpc.aio.ServerInterceptor):
    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials

    async def _admit(self, context: grpc.aio.ServicerContext) -> None:
        address = peer_host(context.peer())
        try:
            caller = self.credentials.identify(_metadata_key(context), _cert_name(context), address, HOW_GRPC)
        except Unauthenticated as exc:
            metrics.AUTH_REFUSED.labels("grpc").inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, exc.detail)
        if caller.name is not None:
            metrics.CALLER_REQUESTS.labels(caller.name, "grpc").inc()
        CALLER.set(caller)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        return self._wrap(handler)

    def _wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        admit = self._admit
        kinds = (
            ("unary_unary", grpc.unary_unary_rpc_method_handler),
            ("unary_stream", grpc.unary_stream_rpc_method_handler),
            ("stream_unary", grpc.stream_unary_rpc_method_handler),
            ("stream_stream", grpc.stream_stream_rpc_method_handler),
        )
        for attr, make in kinds:
            inner = getattr(handler, attr)
            if inner is None:
                continue
            if inspect.isasyncgenfunction(inner):

                async def guarded(request, context, inner=inner):
                    await admit(context)
                    async for answer in inner(request, context):
                        yield answer

            else:

                async def guarded(request, context, inner=inner):
                    await admit(context)
                    answer = inner(request, context)
                    return await answer if inspect.isawaitable(answer) else answer

            return make(guarded, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        return handler
