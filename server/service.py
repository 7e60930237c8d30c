"""The inference service of one device (an engine): loads the model, owns
the batcher, the streaming sessions and their state, and runs the core's
whole-clip and streaming paths. It takes decoded audio and session ids and
gives frames back; it speaks numpy and exceptions, not HTTP. It runs inside
the HTTP process (``--workers 0``, and the tests) or in an engine process of
its own behind ``engine/`` (one per device), with the same methods.

Every request's work can be abandoned: when its awaiting task is cancelled
(client gone, deadline passed, drain), queued model work is dropped and a
long clip stops between windows. A streaming chunk is applied to its session
whole or not at all: the session's state is snapshotted when the chunk starts
and restored if anything (cancellation included) stops it before its answer.

Streaming chunks need no coroutine each: ``submit_chunk`` queues a chunk on
its session and the batcher hands every finished batch back to the event
loop in one call, which post-processes the batch's chunks together
(``streaming.finish_chunks``), answers them and starts each session's next.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

import numpy as np
import torch

from a2e import audio as audio_io
from a2e import clip, streaming
from a2e import tuning as tuning_spec
from a2e.checkpoint import load_model
from a2e.config import model_dims, read_config
from a2e.constants import NUM_BLENDSHAPES, SAMPLE_RATE
from a2e.errors import CheckpointError, ModelOutputError
from a2e.lite import load_lite
from a2e.loudness import LoudnessMode, StreamLoudness
from a2e.separation import SeparationUnavailable, VocalSeparator
from batching import BatcherStopped, CancelScope, MicroBatcher, ModelRunner
from batching.batcher import TaggedResult
from batching import metrics as batch_metrics
from batching.stub import StubRunner

from . import metrics
from .engine_api import (
    ChunkResult,
    Limits,
    SeparationBusy,
    SessionClosed,
    SessionNotFound,
    SessionOpened,
    ShuttingDown,
    shown_path,
)
from .sessions import Session, SessionStore
from .settings import ROOT, Settings

# The result and error types live in engine_api (shared with the HTTP side); they are re-exported here.
__all__ = ["ChunkResult", "InferenceService", "Limits", "SeparationBusy", "SessionNotFound", "SessionOpened",
           "ShuttingDown", "shown_path"]

log = logging.getLogger("a2e.service")
_STREAM_SECONDS = metrics.AUDIO_SECONDS.labels("stream")
_STREAM_FRAMES = metrics.FRAMES.labels("stream")

# Effective length limits keep a request's model time within this share of
# the response timeout, leaving the rest for queueing and everything else.
LIMIT_SHARE_OF_TIMEOUT = 0.5
T = TypeVar("T")


@dataclass
class ModelInfo:
    name: str
    weights: str
    device: str
    dtype: str
    num_identities: int
    parameters: int
    runner_mode: str


def _session_metrics(active: int, expired: int) -> None:
    metrics.SESSIONS_ACTIVE.labels(batch_metrics.engine).set(active)
    if expired:
        metrics.SESSIONS_EXPIRED.labels(batch_metrics.engine).inc(expired)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class InferenceService:
    def __init__(self, settings: Settings, session_id_tag: str = "") -> None:
        self.settings = settings
        self.sessions = SessionStore(
            settings.max_sessions,
            settings.session_idle_timeout_s,
            _session_metrics,
            settings.max_sessions_per_client,
            session_id_tag,
        )
        self.limits = Limits(settings.max_audio_s, settings.max_chunk_s)
        self.draining = False
        self.batcher: MicroBatcher | None = None
        self.model_info: ModelInfo | None = None
        self.not_ready_reason = "model not loaded yet"
        self.load_attempted = False  # load() ran (loaded, or found no weights and said so once)
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
        self.load_attempted = True
        s = self.settings
        if s.model == "stub":
            self._start(StubRunner(), ModelInfo("stub", "", "cpu", "fp32", StubRunner.num_identities, 0, "stub"))
            return
        config_path = s.resolve(s.config_file)
        config = read_config(config_path) if config_path and config_path.exists() else {}
        lam_weights = s.resolve(s.weight or config.get("weight"))
        lite_weights = s.resolve(s.lite_weight)
        lam_there = lam_weights is not None and lam_weights.exists()
        use_lite = s.model == "a2e-lite" or (s.model == "auto" and not lam_there)
        if s.weight_is_explicit and s.model != "a2e-lite" and not lam_there:
            raise CheckpointError(
                f"weights file {lam_weights} (given with --weight) does not exist; fix the path, or leave --weight "
                "out to serve the built-in a2e-lite"
            )
        weights = lite_weights if use_lite else lam_weights
        if weights is None or not weights.exists():
            self.not_ready_reason = f"no model weights found at {weights.name if weights else '(none configured)'}"
            log.warning(
                "no model weights found at %s; serving without a model (inference answers 503). "
                "See pretrained_models/README.md",
                weights or "(none configured)",
            )
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
        self._start(runner, ModelInfo(name, str(weights), device, s.dtype, num_ids, params, runner.mode))
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

    def _start(self, runner, info: ModelInfo) -> None:
        s = self.settings
        self.limits = self._effective_limits(runner)
        self.batcher = MicroBatcher(
            runner,
            max_batch=s.max_batch,
            max_wait_s=s.max_wait_ms / 1000,
            max_queue=s.max_queue,
            max_queue_wait_s=s.max_queue_wait_s,
            on_batch=self._batch_done,
        ).start()
        self.model_info = info

    def _effective_limits(self, runner: ModelRunner) -> Limits:
        """Time one full batch of windows and lower the length limits so that a
        request's model time stays within half the response timeout."""
        s = self.settings
        if not s.auto_limits:
            return Limits(s.max_audio_s, s.max_chunk_s)
        windows = np.zeros((s.max_batch, streaming.WINDOW_SAMPLES), dtype=np.float32)
        identities = np.zeros(s.max_batch, dtype=np.int64)
        runner.run_windows(windows, identities)  # warm-up
        # The fastest of three: what the device can do, not what a busy
        # moment at start-up (other processes loading) let it do.
        timings = []
        for _ in range(3):
            t0 = time.perf_counter()
            runner.run_windows(windows, identities)
            timings.append(time.perf_counter() - t0)
        per_window = max(min(timings) / s.max_batch, 1e-6)
        # A long clip runs one window per second of audio; a chunk one per 2 s.
        speed = 1.0 / per_window
        budget = s.response_timeout_s * LIMIT_SHARE_OF_TIMEOUT
        limits = Limits(
            max_audio_s=min(s.max_audio_s, max(1.0, math.floor(speed * budget))),
            max_chunk_s=min(s.max_chunk_s, max(1.0, math.floor(2 * speed * budget))),
            audio_s_per_s=round(speed, 1),
        )
        if limits.max_audio_s < s.max_audio_s or limits.max_chunk_s < s.max_chunk_s:
            log.warning(
                "this model processes %.1f s of audio per second here: limits lowered to %g s per clip and %g s per "
                "chunk so requests finish within the %g s response timeout (--auto-limits off keeps the configured ones)",
                speed, limits.max_audio_s, limits.max_chunk_s, s.response_timeout_s,
            )
        return limits

    def preload_separator(self) -> None:
        try:
            self.separator.load()
        except SeparationUnavailable:
            pass  # logged; ex_vol requests get the reason

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()
        self.sessions.clear()
        for pool in (self.clip_pool, self.separation_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    @property
    def num_identities(self) -> int:
        return self.model_info.num_identities if self.model_info else 0

    def stats(self, detail: bool = False) -> dict:
        """What /api/health shows of this engine (file names only unless ``detail``)."""
        info = self.model_info
        separation = dict(self.separator.status)
        separation["model_dir"] = shown_path(separation.get("model_dir"), detail)
        return {
            "ready": self.ready,
            "detail": None if self.ready else self.not_ready_reason,
            "model": None if info is None else {**asdict(info), "weights": shown_path(info.weights, detail)},
            "limits": asdict(self.limits),
            "sessions": len(self.sessions),
            "queue_windows": self.batcher.queued_windows if self.batcher else 0,
            "batches": self.batcher.batches_run if self.batcher else 0,
            "windows": self.batcher.windows_run if self.batcher else 0,
            "vocal_isolation": separation,
            "draining": self.draining,
            "gpu_available": torch.cuda.is_available(),
        }

    # -- draining --------------------------------------------------------------
    def begin_drain(self) -> None:
        """Take no new work (in-flight work finishes or is cancelled by whoever awaits it)."""
        self.draining = True

    def accept_work(self) -> None:
        """Accept work again (a server started, or restarted, on this service)."""
        self.draining = False

    def check_accepting(self) -> None:
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another instance")

    async def _until_done(self, work: Awaitable[T], abandon: Callable[[], None]) -> T:
        """Await ``work``; if the awaiting task is cancelled, call ``abandon`` (which stops the work)."""
        fut = asyncio.ensure_future(work)
        fut.add_done_callback(_consume_exception)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            abandon()
            raise

    # -- whole clips -------------------------------------------------------
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

    async def infer_clip(
        self,
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
        self._require_ready()
        self.check_accepting()
        if ex_vol:
            audio = await self._isolate_vocals(audio, sample_rate)
        rng = np.random.default_rng(seed)
        scope = CancelScope(self.batcher)
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
        frames = await self._until_done(work, scope.cancel)
        if not np.isfinite(frames).all():
            raise ModelOutputError("post-processing produced non-finite values")
        metrics.AUDIO_SECONDS.labels("clip").inc(len(audio) / SAMPLE_RATE)
        metrics.FRAMES.labels("clip").inc(len(frames))
        return frames

    # -- streaming -----------------------------------------------------------
    async def open_session(
        self,
        identity: int,
        seed: int | None,
        mode: str,
        loudness: LoudnessMode = LoudnessMode.OFF,
        client: str = "",
        tuning: dict | None = None,
    ) -> SessionOpened:
        """``tuning`` is an ``a2e.tuning`` spec, already validated by the front."""
        self._require_ready()
        self.check_accepting()
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
        state.tuning = tuning_spec.parse(tuning).tuning
        session = self.sessions.create(state, client)
        return SessionOpened(session.id, state.mode.value, state.loudness_mode.value)

    async def close_session(self, session_id: str) -> SessionClosed | None:
        """What the closed session did, or None when there was no such session."""
        session = self.sessions.close(session_id)
        if session is None:
            return None
        seconds = 0.0
        if session.first_chunk_at is not None and session.last_answer_at is not None:
            seconds = session.last_answer_at - session.first_chunk_at
        return SessionClosed(session.chunks_done, session.state.frames_sent, seconds)

    def expire_sessions(self) -> int:
        n = self.sessions.expire()
        if n:
            log.info("expired %d idle session(s)", n)
        return n

    def _session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise SessionNotFound(f"Session not found: {session_id} (unknown, closed or expired)")
        return session

    def _require_ready(self) -> None:
        if not self.ready:
            raise BatcherStopped(self.not_ready_reason)

    def submit_chunk(
        self, session_id: str, audio: np.ndarray, reply: Callable[[ChunkResult | BaseException], None]
    ) -> "StreamChunk":
        """Queue one 16 kHz chunk on its session; ``reply`` is called once, on
        this event loop, with its result or its error. Chunks of a session are
        applied one at a time in the order submitted, each whole or not at
        all. Raises at once (nothing queued) when the service is not ready,
        draining, or the session is unknown. No coroutine per chunk: an engine
        answers hundreds of chunks per batch from one callback. The session
        keeps ``audio`` as its context (uncopied when it is an array of its
        own): pass an array that nobody writes to afterwards (decoded audio,
        a transport's copy)."""
        self._require_ready()
        self.check_accepting()
        session = self._session(session_id)
        chunk = StreamChunk(session, np.asarray(audio, dtype=np.float32), reply, asyncio.get_running_loop())
        session.last_used = time.monotonic()
        if session.first_chunk_at is None:
            session.first_chunk_at = session.last_used
        session.waiting.append(chunk)
        if session.active is None:
            self._start_next(session)
        return chunk

    def cancel_chunk(self, chunk: "StreamChunk") -> None:
        """The chunk's client went away: drop it, leaving its session as if it
        had never come. A chunk already answered stays applied."""
        if chunk.replied:
            return
        chunk.replied = True  # no answer is wanted any more
        session = chunk.session
        if session.active is not chunk:
            try:
                session.waiting.remove(chunk)
            except ValueError:
                pass
            return
        if chunk.future is not None and chunk.future.cancel():  # still queued: gone from the batch
            self._abandon(chunk)
        # else the model has it; _finish_batch sees that no answer is wanted

    async def stream_chunk(self, session_id: str, audio: np.ndarray) -> ChunkResult:
        """``submit_chunk`` awaited (the in-process server and tests)."""
        done = asyncio.get_running_loop().create_future()

        def reply(result: ChunkResult | BaseException) -> None:
            if not done.done():
                done.set_exception(result) if isinstance(result, BaseException) else done.set_result(result)

        chunk = self.submit_chunk(session_id, audio, reply)
        try:
            return await done
        except asyncio.CancelledError:
            self.cancel_chunk(chunk)
            raise

    def _start_next(self, session: Session) -> None:
        """Plan the session's next waiting chunk and queue its windows."""
        while session.active is None and session.waiting:
            chunk = session.waiting.popleft()
            state = session.state
            session.active = chunk
            chunk.saved = state.snapshot()
            chunk.start_time = state.frames_planned / 30.0
            try:
                chunk.plans = streaming.plan_chunk(state, chunk.audio)
                plans = chunk.plans
                if not plans:  # shorter than what completes a frame: no window, no frames
                    _STREAM_SECONDS.inc(self._succeed(chunk, np.zeros((0, NUM_BLENDSHAPES), dtype=np.float32), time.monotonic()))
                    continue
                # The windows go as parts (views of the session's audio): the batcher copies them once.
                windows = [p.parts for p in plans]
                chunk.future = self.batcher.submit_windows(windows, [state.identity] * len(plans), tag=chunk)
            except Exception as exc:  # QueueFull, stopped batcher, bad audio: this chunk only
                chunk.answer(exc)
                self._undo(chunk)

    @staticmethod
    def _undo(chunk: "StreamChunk") -> None:
        chunk.session.state.restore(chunk.saved)  # nothing of it stays: context, frames, generator, level
        chunk.session.active = None

    def _abandon(self, chunk: "StreamChunk") -> None:
        """Undo a started chunk nobody waits for, and go on with the next."""
        self._undo(chunk)
        self._start_next(chunk.session)

    def _fail(self, chunk: "StreamChunk", exc: BaseException) -> None:
        chunk.answer(exc)
        self._abandon(chunk)

    def _succeed(self, chunk: "StreamChunk", frames: np.ndarray, now: float) -> float:
        """Answer the chunk; returns its audio seconds (the caller counts them, once per batch)."""
        session = chunk.session
        session.chunks_done += 1
        session.last_used = session.last_answer_at = now
        seconds = len(chunk.audio) / SAMPLE_RATE
        frames = streaming.tune(session.state, frames)
        chunk.answer(ChunkResult(frames, session.chunks_done, seconds, chunk.start_time, session.state.mode.value))
        session.active = None
        return seconds

    def _batch_done(self, finished: list[tuple[object, TaggedResult]]) -> None:
        """The batcher thread's hand-back: one wake-up of each event loop per batch."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for chunk, future in finished:
            if isinstance(chunk, StreamChunk):
                by_loop.setdefault(chunk.loop, []).append((chunk, future))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._finish_batch, items)
            except RuntimeError:
                pass  # that loop is closed: nobody awaits these chunks any more

    def _finish_batch(self, items: list[tuple["StreamChunk", TaggedResult]]) -> None:
        """Post-process the chunks of one batch together (on their event loop,
        the one thread that touches session state), answer each, and start
        each session's next chunk."""
        ready: list[tuple[StreamChunk, list[np.ndarray]]] = []
        for chunk, future in items:
            if chunk.session.active is not chunk:
                continue  # already undone (cancelled while queued)
            if chunk.replied or future.cancelled():
                self._abandon(chunk)
            elif future.exception() is not None:
                self._fail(chunk, future.exception())
            else:
                ready.append((chunk, future.result()))
        if not ready:
            return
        parts: dict[int, list[np.ndarray]] = {id(c): [] for c, _ in ready}
        try:
            # Window k of every chunk in one call: a chunk's windows follow each other.
            for k in range(max(len(c.plans) for c, _ in ready)):
                round_ = [(c, out[k]) for c, out in ready if k < len(c.plans)]
                finished = streaming.finish_chunks([(c.session.state, c.plans[k], out) for c, out in round_])
                for (c, _), frames in zip(round_, finished):
                    parts[id(c)].append(frames)
        except Exception as exc:
            log.exception("post-processing a batch of %d chunks failed", len(ready))
            for chunk, _ in ready:
                self._fail(chunk, exc)
            return
        now, seconds, frame_count = time.monotonic(), 0.0, 0
        for chunk, _ in ready:
            p = parts[id(chunk)]
            frames = p[0] if len(p) == 1 else np.concatenate(p)
            if not math.isfinite(frames.sum()):  # (frames lie in [0, 1]: a sum is only non-finite through a NaN or inf)
                self._fail(chunk, ModelOutputError("post-processing produced non-finite values"))
            else:
                seconds += self._succeed(chunk, frames, now)
                frame_count += len(frames)
                self._start_next(chunk.session)
        _STREAM_SECONDS.inc(seconds)
        _STREAM_FRAMES.inc(frame_count)


class StreamChunk:
    """A streaming chunk from its submission to its answer."""

    __slots__ = ("session", "audio", "reply", "loop", "saved", "start_time", "plans", "future", "replied")

    def __init__(
        self,
        session: Session,
        audio: np.ndarray,
        reply: Callable[[ChunkResult | BaseException], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.session = session
        self.audio = audio
        self.reply = reply
        self.loop = loop
        self.saved: dict | None = None
        self.start_time = 0.0
        self.plans: list[streaming.ChunkPlan] = []
        self.future: TaggedResult | None = None
        self.replied = False

    def answer(self, result: ChunkResult | BaseException) -> None:
        if self.replied:
            return
        self.replied = True
        try:
            self.reply(result)
        except Exception:  # a reply that cannot be delivered must not stop the batch
            log.exception("answering a chunk failed")


def _consume_exception(fut: asyncio.Future) -> None:
    # Abandoned work may still fail later (Cancelled); that is expected, not worth a warning.
    if not fut.cancelled():
        fut.exception()
