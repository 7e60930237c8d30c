"""Server nodes and HAProxy for a local cluster: each node is ``api_server.py``
on a free loopback port (with its Audio2Face-3D gRPC port if asked), and
HAProxy balances them as deploy/haproxy/haproxy.cfg does (round robin, or
hashing on the session), with the nodes' readiness checked on /api/ready.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from .processes import free_port, kill_tree, require, terminate, wait_for_port

ROOT = Path(__file__).resolve().parent.parent


class HAProxy:
    """HAProxy in front of nodes: round-robin, or hashing on the session id
    (the lines the README documents, from deploy/haproxy/haproxy.cfg); with
    ``grpc_ports`` (the nodes' gRPC ports, in the order of ``node_ports``),
    also a TCP frontend for Audio2Face-3D gRPC streams, as deploy/ has."""

    def __init__(self, workdir: Path, node_ports: list[int], balance: str = "roundrobin", max_body_mb: float = 50.0,
                 grpc_ports: list[int] | None = None) -> None:  # fmt: skip
        self.binary = require("haproxy")
        self.port = free_port()
        self.grpc_port = free_port() if grpc_ports else 0
        self.cfg = workdir / f"haproxy-{self.port}.cfg"
        servers = "\n".join(
            f"    server node{i} 127.0.0.1:{p} check inter 500ms fall 2 rise 1" for i, p in enumerate(node_ports)
        )
        self.stats_socket = workdir / f"haproxy-{self.port}.sock"
        text = HAPROXY_TEMPLATE.format(port=self.port, balance=BALANCE[balance], servers=servers, stats=self.stats_socket,
                                       max_body=int(max_body_mb * 1024 * 1024))  # fmt: skip
        if grpc_ports:
            grpc_servers = "\n".join(
                f"    server node{i} 127.0.0.1:{g} check port {p} inter 500ms fall 2 rise 1"
                for i, (g, p) in enumerate(zip(grpc_ports, node_ports))
            )
            text += GRPC_TEMPLATE.format(port=self.grpc_port, servers=grpc_servers)
        self.cfg.write_text(text)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> "HAProxy":
        check = subprocess.run([self.binary, "-c", "-f", str(self.cfg)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc = subprocess.Popen([self.binary, "-db", "-f", str(self.cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_port(self.port)
        return self

    def servers(self) -> dict[tuple[str, str], str]:
        """Each server's state as HAProxy sees it: (backend, server) -> "UP", "DOWN", ...."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.stats_socket))
            sock.sendall(b"show stat\n")
            text = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
        rows = [line.split(",") for line in text.splitlines() if line and not line.startswith("#")]
        return {(r[0], r[1]): r[17] for r in rows if r[1] not in ("FRONTEND", "BACKEND")}

    def stop(self) -> None:
        terminate(self.proc)


BALANCE = {
    "roundrobin": "    balance roundrobin",
    # The session's chunks to one node while it is up: the id comes in the
    # X-Session-Id header our client sends, else the session_id query parameter.
    "session": "    balance hdr(X-Session-Id)\n    hash-type consistent",
    "first": "    balance first",
}

HAPROXY_TEMPLATE = """\
global
    maxconn 4096
    stats socket {stats} mode 600 level user
defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    timeout tunnel 1h
    retries 2
    option redispatch
frontend lam_a2e
    bind 127.0.0.1:{port}
    # The nodes' --max-upload-mb, refused here: a node that answers 413 and
    # closes mid-upload would leave HAProxy with a reset, not the answer.
    http-request return status 413 content-type application/json string '{{"detail": "request body too large"}}' if {{ req.hdr_val(content-length) gt {max_body} }}
    default_backend nodes
backend nodes
{balance}
    option httpchk GET /api/ready
    http-check expect status 200
{servers}
"""

# One HTTP/2 connection carries one Audio2Face-3D stream: TCP balancing is
# enough, with the nodes' readiness checked on their HTTP port.
GRPC_TEMPLATE = """\
frontend lam_a2e_grpc
    mode tcp
    bind 127.0.0.1:{port}
    default_backend grpc_nodes
backend grpc_nodes
    mode tcp
    balance roundrobin
    option httpchk GET /api/ready
    http-check expect status 200
{servers}
"""


class Node:
    """One server node (api_server.py) sharing the Redis store; with ``grpc``,
    its Audio2Face-3D gRPC API on a port of its own."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, grpc: bool = False,
                 log: Path | None = None) -> None:  # fmt: skip
        self.log = log  # where its output goes; None: a pipe (read when it exits early)
        self.port = free_port()
        self.grpc_port = free_port() if grpc else 0
        self.args = [*args, "--grpc-port", str(self.grpc_port)] if grpc else args
        self.env = dict(os.environ, A2E_LOG_LEVEL="warning", **(env or {}))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> "Node":
        cmd = [sys.executable, "api_server.py", *self.args, "--host", "127.0.0.1", "--port", str(self.port)]
        out = subprocess.PIPE if self.log is None else open(self.log, "a")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True, env=self.env)
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout_s: float = 90.0) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                said = self.proc.stdout.read() if self.log is None else self.log.read_text()[-4000:]
                raise AssertionError(f"node exited early:\n{said}")
            try:
                if requests.get(self.url + "/api/health", timeout=1).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):
                pass
            time.sleep(0.2)
        raise AssertionError("node did not start")

    def kill(self) -> None:
        """SIGKILL: the node and its engine processes vanish without a word."""
        if self.proc is not None and self.proc.poll() is None:
            kill_tree(self.proc.pid)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
