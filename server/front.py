"""What an HTTP worker holds: decoding threads, bounds on work in progress,
shutdown draining, the credentials every door checks, and the engine it
hands decoded audio to.

The engine is an ``engine.service.InferenceService`` in this process
(``--workers 0``, and the tests) or an ``engine.client.EnginePool`` speaking
to engine processes; both are an ``engine.protocol.Engine``, so the
handlers do not know which.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from a2e import audio as audio_io
from a2e.constants import SAMPLE_RATE
from a2e.raw_pcm import RawFormat

from engine.protocol import ChunkResult, Engine, ShuttingDown
from runtime.settings import Settings

from .credentials import Credentials
from .turns import Turn

log = logging.getLogger("a2e.front")

# Vocal isolation works at up to 48 kHz (Demucs resamples to 44.1 kHz anyway).
SEPARATION_MAX_RATE = 48_000
T = TypeVar("T")


class Front:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.credentials = Credentials.from_settings(settings)  # every door's one check
        self.io_pool: ThreadPoolExecutor | None = None
        self.draining = False
        self._drain_expired: asyncio.Event | None = None
        # A whole clip's decoded audio, animation and JSON run to ~100 MB at
        # the length limit; bounding how many are in progress bounds memory.
        self._clip_slots: asyncio.Semaphore | None = None
        # Per session, the last chunk still being handed over (see stream_chunk).
        self._arrivals: dict[str, asyncio.Future] = {}

    def close(self) -> None:
        if self.io_pool is not None:
            # Decodes already queued still finish: their requests are answered while the server drains.
            self.io_pool.shutdown(wait=False)
            self.io_pool = None

    async def run_io(self, fn, *args):
        """Run ``fn`` on the I/O worker threads (decoding, encoding), off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, fn, *args)

    # -- decoding (bounded: see a2e.audio) ------------------------------------
    async def decode_clip(self, data: bytes, ex_vol: bool, raw: RawFormat | None = None) -> tuple[np.ndarray, int]:
        """16 kHz mono, or for vocal isolation the mix (two channels at most, 48 kHz at most)."""
        limit = self.engine.limits.max_audio_s
        if ex_vol:
            max_s = min(self.settings.separation_max_s, limit)
            return await self.run_io(
                lambda: audio_io.decode(data, max_s, mono=False, max_rate=SEPARATION_MAX_RATE, raw=raw)
            )
        return await self.run_io(audio_io.load, data, limit, raw), SAMPLE_RATE

    async def decode_chunk(self, data: bytes, raw: RawFormat | None = None) -> np.ndarray:
        # Any non-empty chunk: in the continuous mode one shorter than what
        # completes a frame answers no frames (its audio joins the context).
        return await self.run_io(audio_io.load, data, self.engine.limits.max_chunk_s, raw)

    async def stream_chunk(
        self, session_id: str, data: bytes, raw: RawFormat | None = None, chunk_index: int | None = None
    ) -> ChunkResult:
        """Decode a chunk (in parallel with others) and hand it to the engine in
        the order chunks arrived here, so a client sending several at once gets
        them applied in its order; the engine applies them as they reach it."""
        turn = self._arrival_turn(session_id)
        try:
            audio = await self.decode_chunk(data, raw)
        except BaseException:
            turn.skip()
            raise
        # Held until the engine answers: the engine applies a session's chunks
        # one at a time anyway, and waiting here costs no task of its own.
        async with turn:
            return await self.until_done(self.engine.stream_chunk(session_id, audio, chunk_index))

    def _arrival_turn(self, session_id: str) -> Turn:
        mine = asyncio.get_running_loop().create_future()
        turn = Turn(self._arrivals.get(session_id), mine)
        self._arrivals[session_id] = mine

        def forget(_: asyncio.Future) -> None:
            if self._arrivals.get(session_id) is mine:
                del self._arrivals[session_id]

        mine.add_done_callback(forget)
        return turn

    def clip_slot(self) -> asyncio.Semaphore:
        """Held by a whole-clip request from decoding to its encoded answer."""
        if self._clip_slots is None:
            self._clip_slots = asyncio.Semaphore(self.settings.max_concurrent_clips)
        return self._clip_slots

    # -- draining ---------------------------------------------------------------
    def begin_drain(self, grace_s: float) -> None:
        """Take no new work; what is still running when ``grace_s`` is nearly
        over is abandoned and answered 503, before the server closes connections."""
        self.draining = True
        self._drain_expired = asyncio.Event()
        asyncio.get_running_loop().call_later(max(0.0, grace_s - 1.0), self._drain_expired.set)
        log.info("draining: new work is refused; in-flight requests have %.0f s to finish", grace_s)

    def accept_work(self) -> None:
        """Accept work again (a server started, or restarted, on this front)."""
        self.draining = False
        self._drain_expired = None
        self._clip_slots = None  # bound to the running loop on first use
        if self.io_pool is None:
            self.io_pool = ThreadPoolExecutor(self.settings.io_workers, thread_name_prefix="a2e-io")

    def check_accepting(self) -> None:
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another instance")

    async def until_done(self, work: Awaitable[T]) -> T:
        """Await the engine's work; when the drain deadline passes first, cancel
        it (the engine drops it) and answer 503."""
        self.check_accepting()
        if self._drain_expired is None:
            return await work
        task = asyncio.ensure_future(work)
        drained = asyncio.ensure_future(self._drain_expired.wait())
        try:
            await asyncio.wait({task, drained}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            drained.cancel()
        if task.done():
            return task.result()
        task.cancel()
        raise ShuttingDown("the server shut down before this request finished; retry on another instance")
