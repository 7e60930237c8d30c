"""One server per port: a second, independent server on the same host must
not start on a port the first one holds, gRPC's included (it used to join
the first one's SO_REUSEPORT group, and the kernel split NVIDIA clients'
streams between the two), and it says which port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import requests

from tests.test_end_to_end import ROOT, free_port, start, stop


@pytest.fixture(scope="module")
def first_server():
    port, grpc_port = free_port(), free_port()
    proc = start(["app.py", "--model", "stub", "--grpc-port", str(grpc_port), "--log-level", "warning"], port,
                 dict(os.environ, A2E_GRPC_PORT=str(grpc_port)))  # fmt: skip
    yield port, grpc_port
    stop(proc)


@pytest.mark.parametrize("mode", [[], ["--workers", "1"]], ids=["one-process", "workers"])
def test_a_second_server_on_the_grpc_port_does_not_start(first_server, mode):
    _, grpc_port = first_server
    second = subprocess.run(
        [sys.executable, "app.py", "--model", "stub", "--host", "127.0.0.1", "--port", str(free_port()),
         "--grpc-port", str(grpc_port), *mode],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"port {grpc_port} (Audio2Face-3D gRPC) is already in use" in second.stderr


def test_a_second_server_on_the_http_port_names_it(first_server):
    port, _ = first_server
    second = subprocess.run([sys.executable, "app.py", "--model", "stub", "--host", "127.0.0.1", "--port", str(port),
                             "--grpc-port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert second.returncode == 2 and f"port {port} (HTTP) is already in use" in second.stderr
    assert "Traceback" not in second.stderr


def test_a_one_process_servers_grpc_port_cannot_be_joined(first_server):
    """What the start-up check cannot see (two servers starting at the same
    moment) the kernel refuses: the listener does not offer SO_REUSEPORT."""
    _, grpc_port = first_server
    intruder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        with pytest.raises(OSError, match="in use"):
            intruder.bind(("127.0.0.1", grpc_port))
    finally:
        intruder.close()


def test_health_names_the_grpc_port(first_server):
    port, grpc_port = first_server
    assert requests.get(f"http://127.0.0.1:{port}/api/health", timeout=5).json()["grpc_port"] == grpc_port
