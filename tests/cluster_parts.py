"""Real parts of a cluster for the tests, on loopback ports: redis-server and
haproxy (Debian's packages; .ci/run installs them) and server nodes.

Where a part is not installed, the tests that need it are skipped saying
so, except in CI (``A2E_REQUIRE_CLUSTER_TOOLS=1``, set by .ci/run), where a
missing part is a failure: a skipped cluster test must not pass for one run.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require(program: str) -> str:
    path = shutil.which(program) or next((p for p in (f"/usr/sbin/{program}", f"/usr/bin/{program}") if os.path.exists(p)), None)
    if path is None:
        why = f"{program} is not installed (Debian package {'redis-server' if 'redis' in program else program}; .ci/run installs it)"
        if os.environ.get("A2E_REQUIRE_CLUSTER_TOOLS"):
            pytest.fail(why)
        pytest.skip(why)
    return path


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port}")


class RedisServer:
    """A redis-server with its append-only file on (as deploy/ runs it), so a
    restart keeps the sessions, as a production Redis does. The tests sync it
    on every write ("always"); deploy/ and the benchmarks, once a second."""

    def __init__(self, workdir: Path, fsync: str = "always") -> None:
        self.binary = require("redis-server")
        self.fsync = fsync
        self.dir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
             "--appendonly", "yes", "--appendfsync", self.fsync, "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        _terminate(self.proc)
        self.proc = None

    def flush(self) -> None:
        import redis

        redis.Redis.from_url(self.url).flushall()


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
        _terminate(self.proc)


def _terminate(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        proc.wait(10)


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

    def __init__(self, args: list[str], env: dict[str, str] | None = None, grpc: bool = False) -> None:
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
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env)
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout_s: float = 90.0) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited early:\n{self.proc.stdout.read()}")
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
            _kill_tree(self.proc.pid)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every process under it (a node's workers and engines)."""
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in children:
        _kill_tree(int(child))


class Cluster:
    """Redis, ``len(node_args)`` nodes on it and HAProxy in front: a cluster on loopback."""

    def __init__(self, workdir: Path, node_args: list[list[str]], balance: str = "roundrobin",
                 env: dict[str, str] | None = None, grpc: bool = False) -> None:  # fmt: skip
        self.redis = RedisServer(workdir)
        self.nodes = [Node([*args, "--state", self.redis.url], env, grpc) for args in node_args]
        max_body = float((env or {}).get("A2E_MAX_UPLOAD_MB", 50.0))
        grpc_ports = [n.grpc_port for n in self.nodes] if grpc else None
        self.proxy = HAProxy(workdir, [n.port for n in self.nodes], balance, max_body, grpc_ports)

    @property
    def url(self) -> str:
        return self.proxy.url

    def start(self) -> "Cluster":
        self.redis.start()
        for node in self.nodes:  # torch imports in parallel
            node.start(wait=False)
        for node in self.nodes:
            node.wait_healthy()
        self.proxy.start()
        self.wait_all_up()
        return self

    def wait_all_up(self, timeout_s: float = 30.0) -> None:
        """Until HAProxy's health checks see every live node (a fresh start, or a restarted node)."""
        deadline = time.time() + timeout_s
        live = sum(1 for n in self.nodes if n.proc is not None and n.proc.poll() is None)
        while time.time() < deadline:
            seen = {requests.get(self.url + "/api/health?detail", timeout=5).headers.get("X-A2E-Node") for _ in range(2 * live)}
            if len(seen - {None}) >= live:
                return
            time.sleep(0.2)

    def metrics(self) -> str:
        """Every live node's /metrics, one after the other."""
        texts = []
        for node in self.nodes:
            try:
                texts.append(requests.get(node.url + "/metrics", timeout=5).text)
            except requests.ConnectionError:
                pass
        return "\n".join(texts)

    def stop(self) -> None:
        self.proxy.stop()
        for node in self.nodes:
            node.stop()
        self.redis.stop()
