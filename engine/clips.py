"""Whole clips on one engine: a clip's windows through the batcher on a
thread pool of their own, and vocal isolation (``ex_vol``) before it on one
worker with a short bounded wait list.

It owns the clip and separation threads; the batcher, readiness and
draining are the service's (``engine.service``), which calls ``run``. A
clip's work can be abandoned: when the awaiting task is cancelled (client
gone, deadline passed, drain), its queued windows are dropped and a long
clip stops between windows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from a2e import audio as audio_io
from a2e import clip
from a2e.constants import SAMPLE_RATE
from a2e.errors import ModelOutputError
from a2e.loudness import LoudnessMode
from a2e.separation import SeparationUnavailable, VocalSeparator
from batching import CancelScope, MicroBatcher
from runtime.settings import Settings

from . import metrics
from .protocol import SeparationBusy

T = TypeVar("T")


class Clips:
    def __init__(self, settings: Settings, device: str) -> None:
        self.settings = settings
        # Whole clips block a thread while their windows run; a pool of their
        # own keeps them from starving the decoding of streaming chunks.
        self.clip_pool = ThreadPoolExecutor(2, thread_name_prefix="a2e-clip")
        # Separation is heavy: one worker, a short bounded wait list.
        self.separator = VocalSeparator(settings.separation_model, settings.separation_model_dir, device)
        self.separation_pool = ThreadPoolExecutor(1, thread_name_prefix="a2e-separation")
        self._separation_waiting = 0

    def preload_separator(self) -> None:
        try:
            self.separator.load()
        except SeparationUnavailable:
            pass  # logged; ex_vol requests get the reason

    def close(self) -> None:
        for pool in (self.clip_pool, self.separation_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    async def _isolate_vocals(self, channels: np.ndarray, sr: int) -> np.ndarray:
        """Separate the vocals (own worker, bounded wait list) and resample to 16 kHz."""
        if self._separation_waiting >= self.settings.separation_queue:
            raise SeparationBusy(
                f"vocal isolation is busy ({self._separation_waiting} requests running or waiting); retry later"
            )
        self._separation_waiting += 1
        try:
            loop = asyncio.get_running_loop()
            voice = await loop.run_in_executor(self.separation_pool, self.separator.vocals, channels, sr)
        finally:
            self._separation_waiting -= 1
        return audio_io.resample(voice, sr)

    async def run(
        self,
        batcher: MicroBatcher,
        audio: np.ndarray,
        identity: int,
        *,
        movement_smooth: bool,
        brow_movement: bool,
        seed: int | None,
        ex_vol: bool = False,
        sample_rate: int = SAMPLE_RATE,
        loudness: LoudnessMode = LoudnessMode.OFF,
    ) -> np.ndarray:
        """Animation ``[T, 52]`` of a clip: 16 kHz mono, or with ``ex_vol`` the
        ``[channels, N]`` mix at ``sample_rate`` whose vocals are animated."""
        if ex_vol:
            audio = await self._isolate_vocals(audio, sample_rate)
        rng = np.random.default_rng(seed)
        scope = CancelScope(batcher)
        work = asyncio.get_running_loop().run_in_executor(
            self.clip_pool,
            lambda: clip.infer_clip(
                scope,
                audio,
                identity,
                rng,
                movement_smooth=movement_smooth,
                brow_movement=brow_movement,
                max_single_pass_seconds=self.settings.single_pass_max_s,
                loudness=loudness,
                target_lufs=self.settings.loudness_target_lufs,
            ),
        )
        frames = await until_done(work, scope.cancel)
        if not np.isfinite(frames).all():
            raise ModelOutputError("post-processing produced non-finite values")
        metrics.AUDIO_SECONDS.labels("clip").inc(len(audio) / SAMPLE_RATE)
        metrics.FRAMES.labels("clip").inc(len(frames))
        return frames


async def until_done(work: Awaitable[T], abandon: Callable[[], None]) -> T:
    """Await ``work``; if the awaiting task is cancelled, call ``abandon`` (which stops the work)."""
    fut = asyncio.ensure_future(work)
    fut.add_done_callback(_consume_exception)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        abandon()
        raise


def _consume_exception(fut: asyncio.Future) -> None:
    # Abandoned work may still fail later (Cancelled); that is expected, not worth a warning.
    if not fut.cancelled():
        fut.exception()
