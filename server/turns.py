"""The order in which a session's chunks arrived at this HTTP worker, kept
while they are decoded in parallel.

A ``Turn`` is one chunk's place in that order: turns form a chain, each
waiting for the one before it, so the engine is handed a session's chunks
in the order the client sent them (the engine then applies them one at a
time, see ``engine.streams``). A turn whose request fails, or is cancelled
while it waits, passes on to the next one as soon as the one before it is
over, so one client that hangs up never blocks the chunks behind it.
"""

from __future__ import annotations

import asyncio

__all__ = ["Turn"]


class Turn:
    """One chunk's place in its session's order."""

    def __init__(self, previous: asyncio.Future | None, mine: asyncio.Future) -> None:
        self._previous = previous
        self._mine = mine

    async def __aenter__(self) -> "Turn":
        if self._previous is not None and not self._previous.done():
            try:
                await asyncio.shield(self._previous)
            except asyncio.CancelledError:
                self.skip()  # passes on once the one before is over
                raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._finish()

    def skip(self) -> None:
        """Give the turn up without taking it (the chunk failed before its turn)."""
        if self._previous is None or self._previous.done():
            self._finish()
        else:
            self._previous.add_done_callback(lambda _: self._finish())

    def _finish(self) -> None:
        if not self._mine.done():
            self._mine.set_result(None)
