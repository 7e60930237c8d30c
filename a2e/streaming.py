"""Streaming inference for one session, independent of HTTP and of batching.

A chunk goes through two steps so that a batcher can sit between them:

1. ``plan_chunk`` (in arrival order): split into sub-chunks of at most 2 s
   and describe each model window of exactly 34133 samples as parts: views
   of the session's audio context and of the chunk, which a batcher copies
   once, into its batch. Only earlier *audio* is needed, so the windows of
   consecutive chunks can run in the same batch.
2. ``finish_chunk`` (in arrival order): compute the chunk's volume, take the
   new frames from the model output and post-process them with the stored
   previous frames. ``finish_chunks`` does this for a whole batch's sessions
   at once, with the volume and post-processing vectorised over them and the
   same results.

Context modes:

* ``continuous`` (default): the window is the session's previous audio
  followed by the chunk, as the API document promises, and the frames follow
  a frame clock: frame k belongs to k/30 s of session audio, whatever the
  chunk sizes (see ``plan_chunk``).
* ``reference``: every window is zeros followed by the chunk, reproducing the
  reference implementation (whose context flag is never cleared) and so its
  published outputs. Post-processing context is kept in both modes.

With a loudness mode on (``a2e.loudness``), the session keeps one level
estimate that moves slowly from chunk to chunk.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

from . import postprocess
from .audio import rms_volume
from .constants import FPS, NUM_BLENDSHAPES, SAMPLE_RATE, VOLUME_HOP, WINDOW_FRAMES, WINDOW_SAMPLES, frame_count
from .loudness import LoudnessMode, StreamLoudness
from .tuning import Tuning, apply as apply_tuning

if TYPE_CHECKING:  # the model (torch) is only needed by whoever runs windows
    from .backend import Backend

# Sub-chunks are multiples of 0.1 s (3 frames) so that, in the reference
# mode, their frame counts add up to the frame count of the whole chunk.
MAX_SUBCHUNK_SAMPLES = 2 * SAMPLE_RATE
# A session's context is kept as the pieces its audio came in; past this
# many (tiny chunks) they are joined into one, so a window stays a few parts.
MAX_CONTEXT_PIECES = 8
# Frame centres k*16000//30 repeat every 3 frames (1600 samples): the
# volume spans of frames 3m, 3m+1, 3m+2 are the first 533, next 533 and next
# 533 samples of the 1600 from 1600m - 266, with one sample left over.
_VOLUME_BLOCK_FRAMES = 3
_VOLUME_BLOCK = _VOLUME_BLOCK_FRAMES * SAMPLE_RATE // FPS
assert _VOLUME_BLOCK * FPS == _VOLUME_BLOCK_FRAMES * SAMPLE_RATE and _VOLUME_BLOCK_FRAMES * VOLUME_HOP < _VOLUME_BLOCK
_ZEROS = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
_ZEROS.setflags(write=False)


class ContextMode(str, Enum):
    CONTINUOUS = "continuous"
    REFERENCE = "reference"


@dataclass
class StreamState:
    """Everything a session remembers between chunks."""

    identity: int
    rng: np.random.Generator
    mode: ContextMode = ContextMode.CONTINUOUS
    # The session's latest audio as the pieces it came in, oldest first (at
    # least a model window's worth once there is that much): the next window
    # is read from them, so planning a chunk copies no audio.
    context: tuple[np.ndarray, ...] = ()
    # The last <= 64 post-processed frames; decoded from a shared store, only what
    # post-processing reads again (postprocess.history_parts), the rest zero.
    previous_frames: np.ndarray | None = None
    previous_volume: np.ndarray | None = None
    frames_sent: int = 0  # frames finished
    frames_planned: int = 0  # frames promised by planned windows (ahead of frames_sent while a chunk runs)
    samples_received: int = 0  # session audio so far (the continuous mode's frame clock; where a resumed stream goes on)
    loudness_mode: LoudnessMode = LoudnessMode.OFF
    loudness: StreamLoudness | None = None  # the session's level estimate, when a mode is on
    tuning: Tuning | None = None  # the session's output tuning (a2e.tuning), None: untouched
    tuned_last: np.ndarray | None = None  # the tuning's smoothing state: the last smoothed frame

    @property
    def previous_audio(self) -> np.ndarray:
        """The last ``WINDOW_SAMPLES`` of session audio (zeros before its start)."""
        return np.concatenate(_tail_parts(self.context, WINDOW_SAMPLES))

    def recent_audio(self, samples: int) -> np.ndarray:
        """The last ``samples`` of the audio context, at most what it holds (no
        zeros), copied only where they span more than one piece."""
        parts = _tail_parts(self.context, min(samples, sum(map(len, self.context))))
        if len(parts) <= 1:
            return parts[0] if parts else np.zeros(0, dtype=np.float32)
        return np.concatenate(parts)

    def snapshot(self) -> dict:
        """What to roll back to, so a chunk is applied whole or not at all.
        Arrays (and the context's pieces) are replaced, never written in
        place, so keeping references is enough; the generator and the level
        estimate change in place, so their states are copied."""
        saved = dict(self.__dict__)
        saved["rng_state"] = self.rng.bit_generator.state
        if self.loudness is not None:
            saved["loudness"] = copy.deepcopy(self.loudness)
        return saved

    def restore(self, saved: dict) -> None:
        saved = dict(saved)
        self.rng.bit_generator.state = saved.pop("rng_state")
        self.__dict__.update(saved)


@dataclass
class ChunkPlan:
    parts: tuple[np.ndarray, ...]  # the model window [WINDOW_SAMPLES] as consecutive float32 pieces
    start_frame: int  # first model frame that belongs to this chunk
    samples: int  # the new audio: the window's last samples
    volume_gain: float = 1.0  # the level estimate's gain (loudness "gates" mode)
    # Frame clock (continuous mode): the session frame index of the first new
    # frame, and the session sample at which the window ends.
    first_frame: int | None = None
    end_sample: int = 0
    _volume: np.ndarray | None = None

    @property
    def window(self) -> np.ndarray:
        """The window as one array (a copy; batchers take ``parts`` as they are)."""
        return np.concatenate(self.parts)

    @property
    def num_frames(self) -> int:
        return WINDOW_FRAMES - self.start_frame

    @property
    def volume(self) -> np.ndarray:
        """One value per new frame (computed when first needed, or for a whole batch by ``finish_chunks``)."""
        if self._volume is None:
            fill_volumes([self])
        return self._volume


def fill_volumes(plans: Sequence[ChunkPlan]) -> None:
    """Compute the volume of every plan that lacks it: frame-clock plans in one
    pass, reference-mode pieces of equal length in one pass each."""
    by_length: dict[int, list[ChunkPlan]] = {}
    clocked: list[ChunkPlan] = []
    for plan in plans:
        if plan._volume is None and plan.first_frame is not None:
            clocked.append(plan)
        elif plan._volume is None:
            by_length.setdefault(plan.samples, []).append(plan)
    if clocked:
        _clock_volumes(clocked)
    for samples, group in by_length.items():
        volumes = _chunk_volume([p.parts[-1] for p in group], group[0].num_frames)  # (the last part: the piece)
        for plan, volume in zip(group, volumes):
            plan._volume = volume * np.float32(plan.volume_gain)


def split_chunk(audio: np.ndarray) -> list[np.ndarray]:
    """Consecutive pieces of at most 2 s (a chunk may be longer than one window)."""
    if 0 < len(audio) <= MAX_SUBCHUNK_SAMPLES:
        return [audio]
    return [audio[i : i + MAX_SUBCHUNK_SAMPLES] for i in range(0, len(audio), MAX_SUBCHUNK_SAMPLES)]


def _tail_parts(pieces: Sequence[np.ndarray], n: int) -> list[np.ndarray]:
    """The last ``n`` samples of consecutive ``pieces`` as views of them, in
    order, with zeros in front where the pieces hold fewer."""
    parts: list[np.ndarray] = []
    need = n
    for piece in reversed(pieces):
        if need == 0:
            break
        take = min(need, len(piece))
        parts.append(piece[len(piece) - take :])
        need -= take
    if need:
        parts.append(_ZEROS[:need])
    parts.reverse()
    return parts


def _chunk_volume(pieces: list[np.ndarray], frames: int) -> np.ndarray:
    """Volumes ``[B, frames]`` of equal-length pieces."""
    vol = rms_volume(pieces, SAMPLE_RATE, frame_length=min(VOLUME_HOP, len(pieces[0])))
    if vol.shape[-1] < frames:  # only for pathological lengths; keep frames and volume aligned
        vol = np.pad(vol, ((0, 0), (0, frames - vol.shape[-1])), mode="edge")
    return vol[:, :frames]


def _clock_volumes(plans: list[ChunkPlan]) -> None:
    """Volume of frame-clock plans: frame k's RMS over the ``VOLUME_HOP``
    samples of session audio centred on ``k/30`` s (zeros past the audio so far,
    as the whole-clip volume pads the clip's end), read from each window.

    Spans repeat every 3 frames (``_VOLUME_BLOCK`` samples), so every plan's
    span blocks go into one array of squares, whose rows of ``[3, 533]`` are
    summed along their last axis: each span's sum is numpy's pairwise sum of
    its own 533 contiguous squares, the same whichever batch it is in.
    """
    half = VOLUME_HOP // 2
    block = _VOLUME_BLOCK
    first_blocks = [p.first_frame // _VOLUME_BLOCK_FRAMES for p in plans]
    counts = [(p.first_frame + p.num_frames - 1) // _VOLUME_BLOCK_FRAMES - m + 1 for p, m in zip(plans, first_blocks)]
    squares = np.empty(sum(counts) * block, dtype=np.float32)
    at = 0
    for plan, m, count in zip(plans, first_blocks, counts):
        # The blocks' samples, in window coordinates: from the first block's
        # start to the window's end (later ones lie past the audio so far).
        begin = m * block - half - (plan.end_sample - WINDOW_SAMPLES)
        length = min(count * block, WINDOW_SAMPLES - begin)
        pos = 0
        for part in plan.parts:
            lo, hi = max(begin - pos, 0), min(begin + length - pos, len(part))
            if lo < hi:
                np.square(part[lo:hi], out=squares[at : at + hi - lo])
                at += hi - lo
            pos += len(part)
        rest = count * block - length
        squares[at : at + rest] = 0.0
        at += rest
    spans = squares.reshape(-1, block)[:, : _VOLUME_BLOCK_FRAMES * VOLUME_HOP].reshape(-1, _VOLUME_BLOCK_FRAMES, VOLUME_HOP)
    volume = np.sqrt(spans.sum(axis=-1).ravel() / np.float32(VOLUME_HOP))
    at = 0
    for plan, m, count in zip(plans, first_blocks, counts):
        skip = plan.first_frame - m * _VOLUME_BLOCK_FRAMES
        plan._volume = volume[at + skip : at + skip + plan.num_frames]
        if plan.volume_gain != 1.0:
            plan._volume = plan._volume * np.float32(plan.volume_gain)
        at += count * _VOLUME_BLOCK_FRAMES


def plan_chunk(state: StreamState, audio: np.ndarray) -> list[ChunkPlan]:
    """Build the model windows for a 16 kHz chunk and advance the audio context.

    Continuous mode keeps a frame clock: after any sequence of chunks the
    session has produced ``frame_count(all its samples)`` frames, the whole
    clip's count, frame k belonging to ``k/30`` s of session audio. A chunk
    (or a piece of one) that completes no new frame runs no window and gives
    no frames; its audio still joins the context. The reference mode rounds
    up per chunk, as the reference does, so its published outputs stay
    reproducible (its frames run ahead of the audio for chunk sizes that are
    not multiples of 1/30 s).

    Windows are given as parts (views of the context and of ``audio``): the
    session keeps ``audio`` as context, so callers hand over an array that
    nobody writes to afterwards."""
    audio = np.asarray(audio, dtype=np.float32)
    gain = 1.0
    if state.loudness_mode is not LoudnessMode.OFF:
        if state.loudness is None:
            state.loudness = StreamLoudness()
        gain = state.loudness.update(audio)
    if state.loudness_mode is LoudnessMode.NORMALIZE:
        audio = np.clip(audio * gain, -1.0, 1.0)
    volume_gain = gain if state.loudness_mode is LoudnessMode.GATES else 1.0
    plans = []
    planned = state.frames_planned
    for piece in split_chunk(audio):
        keep = WINDOW_SAMPLES - len(piece)
        if state.mode is ContextMode.CONTINUOUS:
            head = _tail_parts(state.context, keep) if keep else []
        else:
            head = [_ZEROS[:keep]]
        parts = (*head, piece)
        state.context = _extend_context(state.context, piece)
        state.samples_received += len(piece)
        if state.mode is ContextMode.REFERENCE:
            start = int(WINDOW_FRAMES - len(piece) / SAMPLE_RATE * 30)
            plans.append(ChunkPlan(parts, start, len(piece), volume_gain))
            planned += WINDOW_FRAMES - start
            continue
        due = frame_count(state.samples_received)
        if due > planned:
            plans.append(
                ChunkPlan(parts, WINDOW_FRAMES - (due - planned), len(piece), volume_gain, planned, state.samples_received)
            )
            planned = due
    state.frames_planned = planned
    state.context = tuple(map(_detached, state.context))
    return plans


def _detached(piece: np.ndarray) -> np.ndarray:
    """``piece`` as the context keeps it: a small view of a larger array (the
    end of a long chunk, a slice of a clip) or of a foreign buffer (a request
    body) is copied, as the view would keep all of that alive with the
    session; an array of its own, or a view of one its size, is kept as is."""
    base = piece.base
    if base is None or (isinstance(base, np.ndarray) and base.nbytes <= 2 * piece.nbytes):
        return piece
    return piece.copy()


def _extend_context(context: tuple[np.ndarray, ...], piece: np.ndarray) -> tuple[np.ndarray, ...]:
    """The context with ``piece`` added and pieces no window needs dropped (a
    new tuple: a snapshot's context stays as it was)."""
    pieces = [*context, piece]
    total = sum(map(len, pieces))
    while len(pieces) > 1 and total - len(pieces[0]) >= WINDOW_SAMPLES:
        total -= len(pieces.pop(0))
    if len(pieces) > MAX_CONTEXT_PIECES:
        pieces = [np.concatenate(_tail_parts(pieces, min(total, WINDOW_SAMPLES)))]
    return tuple(pieces)


def finish_chunk(state: StreamState, plan: ChunkPlan, model_frames: np.ndarray) -> np.ndarray:
    """Post-process the new frames of one window and store them as context."""
    return finish_chunks([(state, plan, model_frames)])[0]


def finish_chunks(items: Sequence[tuple[StreamState, ChunkPlan, np.ndarray]]) -> list[np.ndarray]:
    """``finish_chunk`` for the windows of many sessions at once (each session
    at most once). Sessions with as many stored frames and new frames as each
    other (all of them, in a steady stream of equal chunks) are post-processed
    as one array; every session's frames and state come out exactly as they
    would one at a time."""
    fill_volumes([plan for _, plan, _ in items])
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (state, plan, _) in enumerate(items):
        stored = 0 if state.previous_frames is None else len(state.previous_frames)
        groups.setdefault((stored, plan.num_frames), []).append(i)
    results: list[np.ndarray] = [np.empty((0, 0), dtype=np.float32)] * len(items)
    for (stored, fresh), members in groups.items():
        # The group's arrays, filled row by row (np.stack costs more per row than the copy).
        states = [items[i][0] for i in members]
        new = np.empty((len(members), fresh, NUM_BLENDSHAPES), dtype=np.float32)
        volume = np.empty((len(members), fresh), dtype=np.float32)
        previous = np.empty((len(members), stored, NUM_BLENDSHAPES), dtype=np.float32) if stored else None
        previous_volume = np.empty((len(members), stored), dtype=np.float32) if stored else None
        for row, i in enumerate(members):
            state, plan, model_frames = items[i]
            new[row] = model_frames[plan.start_frame :]
            volume[row] = plan.volume
            if stored:
                previous[row] = state.previous_frames
                previous_volume[row] = state.previous_volume
        out = postprocess.postprocess_chunks(previous, previous_volume, new, volume, [s.rng for s in states])
        # What each session keeps, made for the group at once, then one copy
        # per session: a view would keep the whole group's array alive for as
        # long as any one of its sessions sits idle.
        if stored:
            kept = np.concatenate([previous, out], axis=1)[:, -WINDOW_FRAMES:]
            kept_volume = np.concatenate([previous_volume, volume], axis=1)[:, -WINDOW_FRAMES:]
        else:
            kept, kept_volume = out, volume
        for row, i, state in zip(range(len(members)), members, states):
            state.previous_frames, state.previous_volume = kept[row].copy(), kept_volume[row].copy()
            state.frames_sent += fresh
            results[i] = out[row]
    return results


def push_chunk(state: StreamState, backend: "Backend", audio: np.ndarray) -> np.ndarray:
    """Synchronous convenience: plan, run all windows in one batch, finish."""
    plans = plan_chunk(state, audio)
    if not plans:
        return np.zeros((0, NUM_BLENDSHAPES), dtype=np.float32)
    out = backend.run_windows(np.stack([p.window for p in plans]), np.full(len(plans), state.identity))
    return np.concatenate([finish_chunk(state, p, o) for p, o in zip(plans, out)])


def tune(state: StreamState, frames: np.ndarray) -> np.ndarray:
    """A finished chunk's frames as the session's client asked for them. Only
    what is sent is tuned: the stored previous frames, which later chunks
    are post-processed against, stay the model's."""
    if state.tuning is None:
        return frames
    tuned, state.tuned_last = apply_tuning(frames, state.tuning, state.tuned_last)
    return tuned
