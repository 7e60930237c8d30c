"""Whole-clip inference (``/api/infer``), independent of HTTP.

Clips up to ``max_single_pass_seconds`` run in one pass, exactly as the
reference does. Longer clips run as overlapping fixed-size windows through
``Backend.run_windows`` so memory stays bounded whatever the length:

* windows of 34133 samples (64 frames) start every 16000 samples (30 frames
  exactly, so window frame ``t`` is clip frame ``30k + t``);
* the last window is zero-padded at its end, by less than one hop;
* overlapping frames (34 per pair) are averaged with triangular weights that
  fall towards each window's edges, where the model has the least context;
* windows go through the model ``batch`` at a time and are folded into the
  ``[T, 52]`` result at once, so peak memory is the audio, the result and one
  batch of windows.
"""

from __future__ import annotations

import numpy as np

from .audio import rms_volume
from .backend import Backend
from .constants import FPS, SAMPLE_RATE, WINDOW_FRAMES, WINDOW_SAMPLES, frame_count
from .loudness import DEFAULT_TARGET_LUFS, LoudnessMode, clip_gain
from .postprocess import postprocess_clip

HOP_SAMPLES = SAMPLE_RATE  # 1 s
# The wav2vec 2.0 feature encoder needs 400 samples (25 ms, its receptive
# field) for one feature frame; shorter clips are zero-padded to it at the end
# and their output cut back to their own frame count.
MIN_MODEL_SAMPLES = 400
HOP_FRAMES = FPS
_TRIANGLE = np.minimum(np.arange(1, WINDOW_FRAMES + 1), np.arange(WINDOW_FRAMES, 0, -1)).astype(np.float32)


def window_starts(num_samples: int) -> list[int]:
    """Sample offsets of the windows covering a clip (see module docstring)."""
    if num_samples <= WINDOW_SAMPLES:
        return [0]
    last = -(-(num_samples - WINDOW_SAMPLES) // HOP_SAMPLES)  # ceil
    return [k * HOP_SAMPLES for k in range(last + 1)]


def run_windowed(backend: Backend, audio: np.ndarray, identity: int, batch: int = 8) -> np.ndarray:
    """Raw model output ``[T, 52]`` of a long clip from overlapping windows."""
    total = frame_count(len(audio))
    starts = window_starts(len(audio))
    acc = np.zeros((total, 52), dtype=np.float32)
    weight = np.zeros((total, 1), dtype=np.float32)
    for i in range(0, len(starts), batch):
        group = starts[i : i + batch]
        windows = np.zeros((len(group), WINDOW_SAMPLES), dtype=np.float32)
        for row, s in enumerate(group):
            piece = audio[s : s + WINDOW_SAMPLES]
            windows[row, : len(piece)] = piece
        out = backend.run_windows(windows, np.full(len(group), identity))
        for row, s in enumerate(group):
            f0 = (s // HOP_SAMPLES) * HOP_FRAMES
            n = min(WINDOW_FRAMES, total - f0)
            acc[f0 : f0 + n] += out[row, :n] * _TRIANGLE[:n, None]
            weight[f0 : f0 + n] += _TRIANGLE[:n, None]
    return acc / weight


def infer_raw(
    backend: Backend, audio: np.ndarray, identity: int, max_single_pass_seconds: float = 60.0
) -> np.ndarray:
    """Raw model output for a whole 16 kHz clip: one pass, or windows when long."""
    if len(audio) < MIN_MODEL_SAMPLES:
        padded = np.pad(np.asarray(audio, dtype=np.float32), (0, MIN_MODEL_SAMPLES - len(audio)))
        return backend.run_clip(padded, identity)[: frame_count(len(audio))]
    if len(audio) <= max_single_pass_seconds * SAMPLE_RATE:
        return backend.run_clip(audio, identity)
    return run_windowed(backend, audio, identity)


def infer_clip(
    backend: Backend,
    audio: np.ndarray,
    identity: int,
    rng: np.random.Generator,
    *,
    movement_smooth: bool = False,
    brow_movement: bool = False,
    max_single_pass_seconds: float = 60.0,
    loudness: LoudnessMode = LoudnessMode.OFF,
    target_lufs: float = DEFAULT_TARGET_LUFS,
) -> np.ndarray:
    """Post-processed ``[T, 52]`` animation of a whole 16 kHz clip.

    ``loudness`` other than ``off`` measures the clip's integrated loudness
    and scales the gates' volume (``gates``) or the model input (``normalize``)
    as if the clip were at ``target_lufs`` (see ``a2e.loudness``).
    """
    gain = 1.0
    if loudness is not LoudnessMode.OFF:
        gain = clip_gain(audio, target_lufs)
    if loudness is LoudnessMode.NORMALIZE:
        audio = np.clip(audio * gain, -1.0, 1.0)
    raw = infer_raw(backend, audio, identity, max_single_pass_seconds)
    volume = rms_volume(audio)
    if loudness is LoudnessMode.GATES:
        volume = volume * gain
    return postprocess_clip(raw, volume, rng, movement_smooth=movement_smooth, brow=brow_movement)
