"""A SIGTERM at any moment stops the server, as Kubernetes, systemd and
scripts send it: here right as the health check first answers 200 (the
moment that used to be swallowed, 10 times out of 10), a little after, and
while serving, in one process and with HTTP workers (the end-to-end tests
stop serving servers too)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.test_end_to_end import ROOT, free_port, wait_until_healthy

GRACE_S = 5  # --graceful-shutdown-s: the server must be gone within it (plus process teardown)


def first_healthy_then_sigterm(extra: list[str], delay_s: float) -> tuple[int | None, float]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--model", "stub", "--host", "127.0.0.1", "--port", str(port),
         "--graceful-shutdown-s", str(GRACE_S), "--log-level", "warning", *extra],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until_healthy(proc, port, poll_s=0.02)  # as a readiness probe polls, only faster
        time.sleep(delay_s)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(GRACE_S + 10)
        except subprocess.TimeoutExpired:
            return None, time.monotonic() - sent
        return code, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    "extra, delay_s",
    [([], 0.0), ([], 0.1), (["--workers", "1"], 0.0), (["--workers", "1"], 1.0)],
    ids=["one-process-at-once", "one-process-0.1s", "workers-at-once", "workers-serving"],
)
def test_sigterm_at_any_moment_stops_the_server(extra, delay_s):
    code, took = first_healthy_then_sigterm(extra, delay_s)
    assert code is not None, f"still running {took:.1f} s after SIGTERM"
    assert code == 0 and took < GRACE_S + 5
