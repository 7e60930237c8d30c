"""The main process's part: start one engine process per device, restart
what dies (engines, and Sanic's HTTP workers, which its manager does not
restart by itself), stop everything in order.

An engine reports "ready" (or why it cannot start, which stops start-up:
a bad checkpoint is the operator's to fix) through a pipe. A restarted
engine gets the next generation number, so its predecessor's sessions are
told they were lost rather than silently started afresh.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from multiprocessing.process import BaseProcess

from a2e.errors import A2EError
from runtime.settings import Settings

from . import process as engine_process

log = logging.getLogger("a2e.supervisor")

START_TIMEOUT_S = 600.0  # a large checkpoint on a slow disk, CUDA graph capture
WATCH_INTERVAL_S = 0.5
STOP_TIMEOUT_S = 10.0


class EngineStartError(A2EError):
    """An engine could not start (its reason says why)."""


def _mark_dead(pid: int | None) -> None:
    """Tell prometheus-client's multiprocess mode that a process's gauges are gone."""
    if pid is None or not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


class EngineSupervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.devices = settings.device_list
        self.dir = tempfile.mkdtemp(prefix="a2e-engines-")
        self.paths = [os.path.join(self.dir, f"engine-{i}.sock") for i in range(len(self.devices))]
        self.generations = [0] * len(self.devices)
        self.procs: list[BaseProcess | None] = [None] * len(self.devices)
        self._ctx = multiprocessing.get_context("spawn")
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        """Start every engine and wait until each serves; raises EngineStartError."""
        launched = [self._launch(i) for i in range(len(self.devices))]  # load in parallel
        for i, ready in enumerate(launched):
            self._await_ready(i, ready)
        self._watcher = threading.Thread(target=self._watch, name="a2e-engine-watch", daemon=True)
        self._watcher.start()

    def _spawn(self, i: int) -> None:
        self._await_ready(i, self._launch(i))

    def _launch(self, i: int):
        if os.path.exists(self.paths[i]):
            os.unlink(self.paths[i])  # the socket of a predecessor that died
        ready, child_end = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=engine_process.main,
            args=(i, self.generations[i], self.settings, self.paths[i], child_end),
            name=f"a2e-engine-{i}",
        )
        proc.start()
        child_end.close()
        self.procs[i] = proc
        return ready

    def _await_ready(self, i: int, ready) -> None:
        proc = self.procs[i]
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.poll(0.2):
            if not proc.is_alive() or time.monotonic() > deadline:
                proc.kill()
                raise EngineStartError(f"engine {i} ({self.devices[i]}) did not start (exit code {proc.exitcode})")
        message = ready.recv()
        ready.close()
        if not message.get("ok"):
            proc.join(5)
            raise EngineStartError(message.get("message", f"engine {i} could not start"))
        log.info("engine %d ready on %s (pid %d, generation %d)", i, self.devices[i], proc.pid, self.generations[i])

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_INTERVAL_S):
            for i, proc in enumerate(self.procs):
                if proc is None or proc.is_alive() or self._stopping.is_set():
                    continue
                log.error("engine %d (pid %s) died with exit code %s; restarting it", i, proc.pid, proc.exitcode)
                _mark_dead(proc.pid)
                self.generations[i] += 1
                try:
                    self._spawn(i)
                except A2EError as exc:
                    log.error("engine %d could not be restarted: %s; trying again", i, exc)

    def stop(self) -> None:
        """SIGTERM every engine (they finish what is running), then wait; kill stragglers."""
        self._stopping.set()
        for proc in self.procs:
            if proc is not None and proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.procs:
            if proc is None:
                continue
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(1)
            _mark_dead(proc.pid)
        shutil.rmtree(self.dir, ignore_errors=True)


def watch_workers(app, stopping: threading.Event) -> threading.Thread:
    """Restart HTTP worker processes that die (Sanic's manager only marks them failed)."""

    def loop() -> None:
        while not stopping.wait(WATCH_INTERVAL_S):
            manager = getattr(app, "manager", None)
            if manager is None:
                continue
            for proc in list(manager.processes):
                if proc.exitcode in (None, 0) or proc.state.name in ("RESTARTING", "STARTING"):
                    continue
                if stopping.is_set():
                    return
                log.error("HTTP worker %s died with exit code %s; restarting it", proc.name, proc.exitcode)
                _mark_dead(proc.pid)
                try:
                    manager.restart([proc.name])
                except Exception:  # the manager may be shutting down; never take the supervisor down
                    log.exception("could not restart %s", proc.name)

    thread = threading.Thread(target=loop, name="a2e-worker-watch", daemon=True)
    thread.start()
    return thread
