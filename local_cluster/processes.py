"""Child processes of a local cluster: free loopback ports, finding the
machine's binaries, waiting for a port, and stopping a process tree.

The one idea: a missing binary (redis-server, redis-sentinel, redis-cli,
haproxy: Debian's packages) is said once, by name and package, through
``on_missing``, which the tests replace with a skip (or, in CI, a failure).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Callable

PACKAGES = {"redis-server": "redis-server", "redis-sentinel": "redis-sentinel", "redis-cli": "redis-tools",
            "haproxy": "haproxy"}  # fmt: skip


class MissingTool(RuntimeError):
    """A binary the cluster needs is not installed."""


def _raise(why: str) -> None:
    raise MissingTool(why)


on_missing: Callable[[str], None] = _raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require(program: str) -> str:
    """The path of ``program``, or ``on_missing`` says which package has it."""
    path = shutil.which(program) or next((p for p in (f"/usr/sbin/{program}", f"/usr/bin/{program}") if os.path.exists(p)), None)
    if path is None:
        on_missing(f"{program} is not installed (Debian package {PACKAGES.get(program, program)}; .ci/run installs it)")
        raise MissingTool(program)  # on_missing returned: still nothing to run
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


def terminate(proc: subprocess.Popen | None, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not gone within ``timeout_s``."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait(5)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process under it (a node's workers and engines)."""
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in children:
        kill_tree(int(child))
