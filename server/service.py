"""The inference service behind the handlers: loads the model, owns the
batcher, the sessions and the worker threads, and runs the core's whole-clip
and streaming paths. It speaks numpy and exceptions, not HTTP.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from a2e import audio as audio_io
from a2e import clip, streaming
from a2e.checkpoint import load_model
from a2e.config import model_dims, read_config
from a2e.constants import SAMPLE_RATE
from a2e.errors import A2EError, AudioError
from a2e.lite import load_lite
from a2e.loudness import LoudnessMode, StreamLoudness
from a2e.separation import SeparationUnavailable, VocalSeparator
from batching import MicroBatcher, ModelRunner

from . import metrics
from .sessions import Session, SessionStore
from .settings import ROOT, Settings

log = logging.getLogger("a2e.service")

MIN_CHUNK_SECONDS = 0.1


class SeparationBusy(A2EError):
    """Too many vocal-isolation requests are running or waiting."""


@dataclass
class ModelInfo:
    name: str
    weights: str
    device: str
    dtype: str
    num_identities: int
    parameters: int
    runner_mode: str


@dataclass
class ChunkResult:
    frames: np.ndarray
    chunk_index: int
    audio_seconds: float
    start_time: float  # session time of the chunk's first frame


def _session_metrics(active: int, expired: int) -> None:
    metrics.SESSIONS_ACTIVE.set(active)
    if expired:
        metrics.SESSIONS_EXPIRED.inc(expired)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class InferenceService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sessions = SessionStore(settings.max_sessions, settings.session_idle_timeout_s, _session_metrics)
        self.batcher: MicroBatcher | None = None
        self.model_info: ModelInfo | None = None
        self.not_ready_reason = "model not loaded yet"
        self.io_pool = ThreadPoolExecutor(settings.io_workers, thread_name_prefix="a2e-io")
        # Whole clips block a thread while their windows run; a pool of their
        # own keeps them from starving the decoding of streaming chunks.
        self.clip_pool = ThreadPoolExecutor(2, thread_name_prefix="a2e-clip")
        # Separation is heavy: one worker, a short bounded wait list.
        self.separator = VocalSeparator(
            settings.separation_model, settings.separation_model_dir, resolve_device(settings.device)
        )
        self.separation_pool = ThreadPoolExecutor(1, thread_name_prefix="a2e-separation")
        self._separation_waiting = 0

    # -- lifecycle -------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.batcher is not None and self.batcher.running

    def load(self) -> None:
        """Load the weights named by the settings. Missing weights leave the
        service not ready (the server still starts); a file that is there but
        does not fit raises CheckpointError."""
        s = self.settings
        config_path = s.resolve(s.config_file)
        config = read_config(config_path) if config_path and config_path.exists() else {}
        lam_weights = s.resolve(s.weight or config.get("weight"))
        lite_weights = s.resolve(s.lite_weight)
        lam_there = lam_weights is not None and lam_weights.exists()
        use_lite = s.model == "a2e-lite" or (s.model == "auto" and not lam_there)
        weights = lite_weights if use_lite else lam_weights
        if weights is None or not weights.exists():
            self.not_ready_reason = f"no model weights found at {weights or '(none configured)'}"
            log.warning("%s; serving without a model (inference answers 503). See pretrained_models/README.md", self.not_ready_reason)
            return
        if s.cpu_threads > 0:
            torch.set_num_threads(s.cpu_threads)
        device = resolve_device(s.device)
        t0 = time.perf_counter()
        if use_lite:
            model, name = load_lite(weights), "a2e-lite"
            num_ids = model.dims.num_identity_classes
            if s.model == "auto":
                log.info("no LAM-A2E weights at %s: using the built-in a2e-lite model", lam_weights)
        else:
            dims = model_dims(config, base_dir=ROOT)
            model = load_model(weights, dims, "cpu")
            name = "lam-a2e" + ("-transformer" if dims.use_transformer else "")
            num_ids = dims.num_identity_classes
        params = sum(p.numel() for p in model.parameters())
        runner = ModelRunner(
            model,
            device,
            dtype=s.dtype,
            max_batch=s.max_batch,
            cuda_graphs=s.cuda_graphs,
            compile=s.compile,
        )
        self.batcher = MicroBatcher(
            runner, max_batch=s.max_batch, max_wait_s=s.max_wait_ms / 1000, max_queue=s.max_queue
        ).start()
        self.model_info = ModelInfo(
            name=name,
            weights=str(weights),
            device=device,
            dtype=s.dtype,
            num_identities=num_ids,
            parameters=params,
            runner_mode=runner.mode,
        )
        log.info(
            "model loaded: %s from %s (%.1f M parameters, %d identities) on %s/%s, %s, in %.1f s",
            name,
            weights,
            params / 1e6,
            num_ids,
            device,
            s.dtype,
            runner.mode,
            time.perf_counter() - t0,
        )

    def preload_separator(self) -> None:
        try:
            self.separator.load()
        except SeparationUnavailable:
            pass  # logged; ex_vol requests get the reason

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()
        self.sessions.clear()
        for pool in (self.io_pool, self.clip_pool, self.separation_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    @property
    def num_identities(self) -> int:
        return self.model_info.num_identities if self.model_info else 0

    async def run_io(self, fn, *args):
        """Run ``fn`` on the I/O worker threads (decoding, encoding), off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, fn, *args)

    # -- whole clips -------------------------------------------------------
    async def _isolate_vocals(self, data: bytes) -> np.ndarray:
        """Decode, separate the vocals (own worker, bounded wait list), resample to 16 kHz."""
        if self._separation_waiting >= self.settings.separation_queue:
            raise SeparationBusy(
                f"vocal isolation is busy ({self._separation_waiting} requests running or waiting); retry later"
            )
        self._separation_waiting += 1
        try:
            channels, sr = await self.run_io(lambda: audio_io.decode(data, self.settings.separation_max_s, mono=False))
            loop = asyncio.get_running_loop()
            voice = await loop.run_in_executor(self.separation_pool, self.separator.vocals, channels, sr)
        finally:
            self._separation_waiting -= 1
        return audio_io.resample(voice, sr)

    async def infer_clip(
        self,
        data: bytes,
        identity: int,
        *,
        movement_smooth: bool,
        brow_movement: bool,
        seed: int | None,
        ex_vol: bool = False,
        loudness: LoudnessMode = LoudnessMode.OFF,
    ) -> tuple[np.ndarray, float]:
        assert self.batcher is not None
        if ex_vol:
            audio = await self._isolate_vocals(data)
        else:
            audio = await self.run_io(audio_io.load, data, self.settings.max_audio_s)
        rng = np.random.default_rng(seed)
        frames = await asyncio.get_running_loop().run_in_executor(
            self.clip_pool,
            lambda: clip.infer_clip(
                self.batcher,
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
        seconds = len(audio) / SAMPLE_RATE
        metrics.AUDIO_SECONDS.labels("clip").inc(seconds)
        metrics.FRAMES.labels("clip").inc(len(frames))
        return frames, seconds

    # -- streaming -----------------------------------------------------------
    def open_session(
        self, identity: int, seed: int | None, mode: str, loudness: LoudnessMode = LoudnessMode.OFF
    ) -> Session:
        rng = np.random.default_rng(seed if seed is not None else secrets.randbits(64))
        context = streaming.ContextMode(mode)
        state = streaming.StreamState(
            identity=identity,
            rng=rng,
            mode=context,
            # The reference mode reproduces the reference: never level-adjusted.
            loudness_mode=LoudnessMode.OFF if context is streaming.ContextMode.REFERENCE else loudness,
        )
        if state.loudness_mode is not LoudnessMode.OFF:
            state.loudness = StreamLoudness(self.settings.loudness_target_lufs)
        return self.sessions.create(state)

    def close_session(self, session_id: str) -> Session | None:
        return self.sessions.close(session_id)

    def expire_sessions(self) -> int:
        n = self.sessions.expire()
        if n:
            log.info("expired %d idle session(s)", n)
        return n

    async def stream_chunk(self, session: Session, data: bytes) -> ChunkResult:
        """Process one chunk of a session, in the order chunks arrived."""
        assert self.batcher is not None
        ticket = session.ticket()
        try:
            audio = await self.run_io(audio_io.load, data, self.settings.max_chunk_s)
            if len(audio) < MIN_CHUNK_SECONDS * SAMPLE_RATE:
                raise AudioError(
                    f"audio chunk too short: {len(audio)} samples at 16 kHz ({len(audio) / SAMPLE_RATE:.3f} s); "
                    f"at least {int(MIN_CHUNK_SECONDS * SAMPLE_RATE)} samples (0.1 s) are needed"
                )
        except BaseException:
            await session.skip(ticket)
            raise
        state = session.state
        try:
            async with session.turn(ticket, "plan"):
                saved = (state.previous_audio, copy.deepcopy(state.loudness))
                plans = streaming.plan_chunk(state, audio)
                try:
                    future = self.batcher.submit_windows(
                        np.stack([p.window for p in plans]), np.full(len(plans), state.identity)
                    )
                except BaseException:
                    state.previous_audio, state.loudness = saved  # nothing ran: the context stays as it was
                    raise
            model_out = await asyncio.wrap_future(future)
        except BaseException:
            async with session.turn(ticket, "finish"):
                pass
            raise
        async with session.turn(ticket, "finish"):
            start_time = state.frames_sent / 30.0
            frames = np.concatenate([streaming.finish_chunk(state, p, o) for p, o in zip(plans, model_out)])
            session.chunks_done += 1
            index = session.chunks_done
            session.last_used = time.monotonic()
        seconds = len(audio) / SAMPLE_RATE
        metrics.AUDIO_SECONDS.labels("stream").inc(seconds)
        metrics.FRAMES.labels("stream").inc(len(frames))
        return ChunkResult(frames, index, seconds, start_time)
