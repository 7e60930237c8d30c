"""The inference service of one device (an engine): the one object a front
door's work reaches. It loads the model (``engine.loading``), owns the
batcher, and runs whole clips (``engine.clips``) and streaming sessions
(``engine.streams``, answered from ``engine.handback``). It takes decoded
audio and session ids and gives frames back; it speaks numpy and
exceptions, not HTTP.

It runs inside the HTTP process (``--workers 0``, and the tests) or in an
engine process of its own (``engine.process``, one per device), with the
same methods; HTTP workers reach the latter through ``engine.client``.

The one idea: every request's work can be abandoned. When its awaiting
task is cancelled (client gone, deadline passed, drain), queued model work
is dropped, a long clip stops between windows, and a streaming chunk
leaves its session as if it had never come.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import torch

from a2e.constants import SAMPLE_RATE
from a2e.loudness import LoudnessMode
from batching import BatcherStopped, MicroBatcher
from runtime.settings import Settings

from .clips import Clips
from .handback import batch_done
from .loading import LIMIT_SHARE_OF_TIMEOUT, Loaded, ModelInfo, effective_limits, load_runner, resolve_device
from .protocol import ChunkResult, Limits, SessionClosed, SessionOpened, SessionPosition, ShuttingDown, shown_path
from .streams import StreamChunk, Streams

__all__ = ["InferenceService", "ModelInfo", "StreamChunk"]


class InferenceService:
    def __init__(self, settings: Settings, session_id_tag: str = "") -> None:
        self.settings = settings
        if settings.shared_state:
            from .shared_streams import SharedStreams  # redis-py only where it is used

            self.streams: Streams = SharedStreams(settings, session_id_tag)
        else:
            self.streams = Streams(settings, session_id_tag)
        self.sessions = self.streams.sessions
        self.clips = Clips(settings, resolve_device(settings.device))
        self.limits = Limits(settings.max_audio_s, settings.max_chunk_s)
        self.draining = False
        self.batcher: MicroBatcher | None = None
        self.model_info: ModelInfo | None = None
        self.not_ready_reason = "model not loaded yet"
        self.load_attempted = False  # load() ran (loaded, or found no weights and said so once)

    # -- lifecycle -------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.batcher is not None and self.batcher.running

    def load(self) -> None:
        """Load the weights named by the settings. Missing weights leave the
        service not ready (the server still starts); a file that is there but
        does not fit raises CheckpointError."""
        self.load_attempted = True
        self.start(load_runner(self.settings))

    def start(self, loaded: Loaded) -> None:
        """Serve with a loaded model (or say why there is none)."""
        if loaded.runner is None:
            self.not_ready_reason = loaded.not_ready_reason
            return
        s = self.settings
        self.limits = effective_limits(s, loaded.runner)
        self.batcher = MicroBatcher(
            loaded.runner,
            max_batch=s.max_batch,
            max_wait_s=s.max_wait_ms / 1000,
            max_queue=s.max_queue,
            # Queued work must leave its request time to be answered: at most half the response timeout.
            max_queue_wait_s=min(s.max_queue_wait_s, s.response_timeout_s * LIMIT_SHARE_OF_TIMEOUT),
            batch_s=s.max_batch / self.limits.audio_s_per_s if self.limits.audio_s_per_s else 0.0,
            on_batch=functools.partial(batch_done, self.streams),
        ).start()
        self.streams.batcher = self.batcher
        self.model_info = loaded.info

    def preload_separator(self) -> None:
        self.clips.preload_separator()

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()
        self.sessions.clear()
        self.clips.close()

    @property
    def num_identities(self) -> int:
        return self.model_info.num_identities if self.model_info else 0

    def stats(self, detail: bool = False) -> dict:
        """What /api/health shows of this engine (file names only unless ``detail``)."""
        info = self.model_info
        separation = dict(self.clips.separator.status)
        separation["model_dir"] = shown_path(separation.get("model_dir"), detail)
        return {
            "ready": self.ready,
            "detail": None if self.ready else self.not_ready_reason,
            "model": None if info is None else {**asdict(info), "weights": shown_path(info.weights, detail)},
            "limits": asdict(self.limits),
            "sessions": len(self.sessions),
            "state": self.streams.health(),
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

    def _require_ready(self) -> None:
        if not self.ready:
            raise BatcherStopped(self.not_ready_reason)

    # -- whole clips -------------------------------------------------------
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
        return await self.clips.run(
            self.batcher, audio, identity, movement_smooth=movement_smooth, brow_movement=brow_movement, seed=seed,
            ex_vol=ex_vol, sample_rate=sample_rate, loudness=loudness,
        )  # fmt: skip

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
        return await self.streams.open(identity, seed, mode, loudness, client, tuning)

    async def close_session(self, session_id: str) -> SessionClosed | None:
        """What the closed session did, or None when there was no such session."""
        return await self.streams.close(session_id)

    async def session_position(self, session_id: str) -> SessionPosition:
        """Where a session stands (a stream resuming it elsewhere)."""
        self._require_ready()
        return await self.streams.position(session_id)

    def expire_sessions(self) -> int:
        return self.streams.expire()

    async def check_state(self) -> None:
        """Refresh what /api/health says of the session store."""
        await self.streams.check_store()

    def submit_chunk(
        self,
        session_id: str,
        audio: np.ndarray,
        reply: Callable[[ChunkResult | BaseException], None],
        chunk_index: int | None = None,
    ) -> StreamChunk:
        """Queue one 16 kHz chunk on its session; ``reply`` is called once, on
        this event loop, with its result or its error. Chunks of a session are
        applied one at a time in the order submitted, each whole or not at
        all. Raises at once (nothing queued) when the service is not ready,
        draining, or the session is unknown. No coroutine per chunk: an engine
        answers hundreds of chunks per batch from one callback. The session
        keeps ``audio`` as its context (uncopied when it is an array of its
        own): pass an array that nobody writes to afterwards (decoded audio,
        a transport's copy). ``chunk_index``: the client's number for the
        chunk (a retry of the last one is answered again, not applied twice)."""
        self._require_ready()
        self.check_accepting()
        return self.streams.submit(session_id, audio, reply, chunk_index)

    def cancel_chunk(self, chunk: StreamChunk) -> None:
        """The chunk's client went away: drop it, leaving its session as if it
        had never come. A chunk already answered stays applied."""
        self.streams.cancel(chunk)

    async def stream_chunk(self, session_id: str, audio: np.ndarray, chunk_index: int | None = None) -> ChunkResult:
        """``submit_chunk`` awaited (the in-process server and tests)."""
        done = asyncio.get_running_loop().create_future()

        def reply(result: ChunkResult | BaseException) -> None:
            if not done.done():
                done.set_exception(result) if isinstance(result, BaseException) else done.set_result(result)

        chunk = self.submit_chunk(session_id, audio, reply, chunk_index)
        try:
            return await done
        except asyncio.CancelledError:
            self.cancel_chunk(chunk)
            raise
