"""Stopping a serving process whenever it is asked: a SIGTERM (or SIGINT, or
an ``app.stop()`` of ours) at any moment of start-up or serving stops the
server, which then drains as usual within ``--graceful-shutdown-s``.

The one idea: Sanic installs its signal handler before it runs the
``after_server_start`` listeners, inside ``loop.run_until_complete``. A
stop in that window calls ``loop.stop()`` there, where it only ends that
``run_until_complete`` (or aborts it), and the ``run_forever`` that follows
serves forever: the port already answers, so health checks and
orchestrators see a live server that ignores their SIGTERM. So a stop asked
before the loop really serves (``app.state.is_running``, set just before
``run_forever``) is only remembered, and made as soon as it serves, where
it takes effect. Signals that arrive before Sanic's handler exists are
remembered by the caller (``early``) and honoured the same way. The main
process of ``--workers`` has its own window, in Sanic's worker manager:
``stop_manager_whenever_asked``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from typing import Any

from sanic import Sanic

log = logging.getLogger("a2e.server")
POLL_S = 0.02


class StoppableSanic(Sanic):
    """A Sanic app whose ``stop()`` (Sanic's own signal handler calls it) is
    remembered while it starts, and made once it serves."""

    def stop(self, terminate: bool = True, unregister: bool = False) -> None:
        if self.state.is_running or self.asgi:
            super().stop(terminate=terminate, unregister=unregister)
        else:
            self.ctx.stop_asked = True  # made once serving: see the module docstring

    def stop_whenever_asked(self, early: Sequence[int] = ()) -> None:
        """Watch, from the start of serving, for stops asked during start-up.
        ``early``: signals received before serving began (filled by the caller's own handler)."""
        self.ctx.stop_asked = False

        @self.before_server_start
        async def watch_for_stops(app: Sanic) -> None:
            if app.asgi:
                return  # an ASGI server owns start-up and signals

            async def once_serving() -> None:
                while not app.state.is_running:  # still inside Sanic's start-up
                    await asyncio.sleep(POLL_S)
                if app.ctx.stop_asked or early:
                    app.ctx.stop_asked = False
                    log.info("a stop was asked during start-up: stopping")
                    app.stop(terminate=False)

            # Our own task (not app.add_task): it ends by itself, and Sanic warns of its tasks at shutdown.
            app.ctx.stop_watch = asyncio.ensure_future(once_serving())


def stop_manager_whenever_asked(manager: Any, early: Sequence[int] = ()) -> None:
    """The main process of ``--workers``: a SIGTERM or SIGINT at any moment
    reaches Sanic's worker manager when it can act on it.

    Sanic's manager (25.12) waits for every worker's start-up ack in a loop
    that, given the shutdown message a signal posts, posts it back to itself
    and spins forever once the signal has also terminated the worker, which
    then never acks. So a signal that comes while the manager waits is held,
    and handed over as soon as the wait is over; ``early`` (signals before
    the manager existed) likewise."""
    pending: list[int] = list(early)
    waited: list[bool] = []
    wait_for_ack = manager.wait_for_ack

    def wait_then_hand_over() -> None:
        wait_for_ack()
        waited.append(True)
        if pending:
            log.info("a stop was asked while the workers started: stopping")
            manager.shutdown_signal(pending[0], None)

    def on_signal(signum: int, frame: Any) -> None:
        if waited:
            manager.shutdown_signal(signum, frame)
        elif not pending:
            pending.append(signum)

    manager.wait_for_ack = wait_then_hand_over  # an instance attribute: the manager's own method, wrapped
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
