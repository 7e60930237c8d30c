"""Whether the ports this server is to listen on are free: checked once, at
start-up, before anything is loaded, so that a second instance on the same
host (or a stale one still running) stops at once with the port it wanted,
instead of a traceback or, for gRPC, silently sharing the port.

The one idea: gRPC listeners of one server's HTTP workers share their port
through SO_REUSEPORT, and the kernel would let any other process of the
same user join that group and take half of the streams. A plain bind
without SO_REUSEPORT fails while anyone listens on the port, so the main
process probes with one before its workers bind (a server without workers
binds gRPC without SO_REUSEPORT itself; see ``server.ace_grpc.listener``).
"""

from __future__ import annotations

import errno
import socket

from a2e.errors import A2EError


class PortInUse(A2EError):
    """A port this server is to listen on is taken."""


def check_free(host: str, port: int, what: str, flag: str) -> None:
    """Raise PortInUse, naming the port, when something listens on ``host:port``."""
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR: connections of an earlier run still in TIME_WAIT do not count as in use.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise PortInUse(f"cannot listen on {host}:{port} for {what}: {exc.strerror}") from None
        raise PortInUse(
            f"port {port} ({what}) is already in use on {host}: another instance of this server, a stale one, or "
            f"another program holds it; stop it or choose another port with {flag}"
        ) from None
    finally:
        probe.close()
