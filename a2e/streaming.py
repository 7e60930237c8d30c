"""Streaming inference for one session, independent of HTTP and of batching.

A chunk goes through two steps so that a batcher can sit between them:

1. ``plan_chunk`` (in arrival order): split into sub-chunks of at most 2 s,
   build each model window of exactly 34133 samples from the session's audio
   context and compute the chunk's volume. Only earlier *audio* is needed, so
   the windows of consecutive chunks can run in the same batch.
2. ``finish_chunk`` (in arrival order): take the new frames from the model
   output and post-process them with the stored previous frames.
   ``finish_chunks`` does this for a whole batch's sessions at once, with
   the post-processing vectorised over them and the same results.

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
from .constants import NUM_BLENDSHAPES, SAMPLE_RATE, VOLUME_HOP, WINDOW_FRAMES, WINDOW_SAMPLES, frame_count
from .loudness import LoudnessMode, StreamLoudness
from .tuning import Tuning, apply as apply_tuning

if TYPE_CHECKING:  # the model (torch) is only needed by whoever runs windows
    from .backend import Backend

# Sub-chunks are multiples of 0.1 s (3 frames) so that, in the reference
# mode, their frame counts add up to the frame count of the whole chunk.
MAX_SUBCHUNK_SAMPLES = 2 * SAMPLE_RATE


class ContextMode(str, Enum):
    CONTINUOUS = "continuous"
    REFERENCE = "reference"


@dataclass
class StreamState:
    """Everything a session remembers between chunks."""

    identity: int
    rng: np.random.Generator
    mode: ContextMode = ContextMode.CONTINUOUS
    previous_audio: np.ndarray | None = None  # the last model window [W]
    previous_frames: np.ndarray | None = None  # last <= 64 post-processed frames
    previous_volume: np.ndarray | None = None
    frames_sent: int = 0  # frames finished
    frames_planned: int = 0  # frames promised by planned windows (ahead of frames_sent while a chunk runs)
    samples_received: int = 0  # session audio so far (the continuous mode's frame clock)
    loudness_mode: LoudnessMode = LoudnessMode.OFF
    loudness: StreamLoudness | None = None  # the session's level estimate, when a mode is on
    tuning: Tuning | None = None  # the session's output tuning (a2e.tuning), None: untouched
    tuned_last: np.ndarray | None = None  # the tuning's smoothing state: the last smoothed frame

    def snapshot(self) -> dict:
        """What to roll back to, so a chunk is applied whole or not at all.
        Arrays are replaced, never written in place, so keeping references is
        enough; the generator and the level estimate change in place, so their
        states are copied."""
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
    window: np.ndarray  # [WINDOW_SAMPLES] float32
    start_frame: int  # first model frame that belongs to this chunk
    samples: int  # the new audio: the window's last samples
    volume_gain: float = 1.0  # the level estimate's gain (loudness "gates" mode)
    # Frame clock (continuous mode): the session frame index of the first new
    # frame, and the session sample at which the window ends.
    first_frame: int | None = None
    end_sample: int = 0
    _volume: np.ndarray | None = None

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
        volumes = _chunk_volume([p.window[WINDOW_SAMPLES - samples :] for p in group], group[0].num_frames)
        for plan, volume in zip(group, volumes):
            plan._volume = volume * np.float32(plan.volume_gain)


def split_chunk(audio: np.ndarray) -> list[np.ndarray]:
    """Consecutive pieces of at most 2 s (a chunk may be longer than one window)."""
    return [audio[i : i + MAX_SUBCHUNK_SAMPLES] for i in range(0, len(audio), MAX_SUBCHUNK_SAMPLES)]


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

    Consecutive frames' spans follow each other (centres 533 or 534 samples
    apart), so the squared tails of all plans' windows go into one array and
    one ``reduceat`` sums every span (in float64). A span's sum depends only on
    its own samples, so a batch gives what one plan alone does.
    """
    half = VOLUME_HOP // 2
    counts = np.array([p.num_frames for p in plans])
    frames = np.repeat(np.array([p.first_frame for p in plans]) - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
    offsets = np.repeat(np.array([p.end_sample for p in plans]) - WINDOW_SAMPLES, counts)
    start = frames * SAMPLE_RATE // 30 - half - offsets  # in each window
    stop = np.minimum(start + VOLUME_HOP, WINDOW_SAMPLES)  # past the audio so far: zeros, nothing to add
    firsts = start[np.cumsum(counts) - counts]  # each plan's first span start
    lengths = WINDOW_SAMPLES - firsts
    bases = np.cumsum(lengths) - lengths  # where each plan's tail goes in the flat array
    squares = np.empty(int(lengths.sum()) + 1, dtype=np.float32)
    squares[-1] = 0.0  # reduceat's last index must be inside the array
    for plan, first, base, length in zip(plans, firsts.tolist(), bases.tolist(), lengths.tolist()):
        np.square(plan.window[first:], out=squares[base : base + length])
    shift = np.repeat(bases - firsts, counts)
    bounds = np.stack([start + shift, stop + shift], axis=1).ravel()
    sums = np.add.reduceat(squares, bounds, dtype=np.float64)[::2]  # (odd entries: the gaps between spans)
    volume = np.sqrt(sums / VOLUME_HOP).astype(np.float32)
    at = 0
    for plan in plans:
        plan._volume = volume[at : at + plan.num_frames] * np.float32(plan.volume_gain)
        at += plan.num_frames


def plan_chunk(state: StreamState, audio: np.ndarray) -> list[ChunkPlan]:
    """Build the model windows for a 16 kHz chunk and advance the audio context.

    Continuous mode keeps a frame clock: after any sequence of chunks the
    session has produced ``frame_count(all its samples)`` frames, the whole
    clip's count, frame k belonging to ``k/30`` s of session audio. A chunk
    (or a piece of one) that completes no new frame runs no window and gives
    no frames; its audio still joins the context. The reference mode rounds
    up per chunk, as the reference does, so its published outputs stay
    reproducible (its frames run ahead of the audio for chunk sizes that are
    not multiples of 1/30 s)."""
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
        if state.mode is ContextMode.CONTINUOUS and state.previous_audio is not None:
            head = state.previous_audio[len(state.previous_audio) - keep :] if keep else state.previous_audio[:0]
        else:
            head = np.zeros(keep, dtype=np.float32)
        window = np.concatenate([head, piece]).astype(np.float32, copy=False)
        state.previous_audio = window
        if state.mode is ContextMode.REFERENCE:
            start = int(WINDOW_FRAMES - len(piece) / SAMPLE_RATE * 30)
            plans.append(ChunkPlan(window, start, len(piece), volume_gain))
            planned += WINDOW_FRAMES - start
            continue
        state.samples_received += len(piece)
        due = frame_count(state.samples_received)
        if due > planned:
            plans.append(
                ChunkPlan(window, WINDOW_FRAMES - (due - planned), len(piece), volume_gain, planned, state.samples_received)
            )
            planned = due
    state.frames_planned = planned
    return plans


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
    for (stored, _), members in groups.items():
        states = [items[i][0] for i in members]
        new = np.stack([np.asarray(items[i][2], dtype=np.float32)[items[i][1].start_frame :] for i in members])
        volume = np.stack([items[i][1].volume for i in members])
        previous = np.stack([s.previous_frames for s in states]) if stored else None
        previous_volume = np.stack([s.previous_volume for s in states]) if stored else None
        out = postprocess.postprocess_chunks(previous, previous_volume, new, volume, [s.rng for s in states])
        for row, i, state in zip(out, members, states):
            plan = items[i][1]
            if state.previous_frames is None:
                state.previous_frames, state.previous_volume = row.copy(), plan.volume.copy()
            else:
                state.previous_frames = np.concatenate([state.previous_frames, row])[-WINDOW_FRAMES:]
                state.previous_volume = np.concatenate([state.previous_volume, plan.volume])[-WINDOW_FRAMES:]
            state.frames_sent += len(row)
            results[i] = row
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
