"""Post-processing of model output, as the reference applies it.

Every function takes a ``[frames, 52]`` float array in ARKit order and returns
a new array (inputs are never modified). Randomness comes only from the
``numpy.random.Generator`` the caller passes, so a request can be replayed.

Constants (0.001 silence, 7-frame runs, 3/5-frame blends, Savitzky-Golay 5/2,
blink and brow timing) are the reference's, see the model spec, section 4.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.ndimage import convolve1d, label
from scipy.signal import savgol_coeffs

from .constants import (
    BLINK_LENGTH,
    BLINK_PATTERNS,
    BROW_CURVES,
    EYE_BLINK_LEFT,
    EYE_BLINK_RIGHT,
    MOUTH_GROUP,
    SYMMETRIC_PAIRS,
)

SILENCE_THRESHOLD = 0.001
MIN_SILENCE_FRAMES = 7
SILENCE_MOUTH_FACTOR = 0.1
SILENCE_EDGE_BLEND = 3
FIRST_CHUNK_BLEND = 3
NEXT_CHUNK_BLEND = 5
SAVGOL_WINDOW = 5
SAVGOL_ORDER = 2
BLINK_SCALE = (0.8, 1.0)
CLIP_BLINK_GAP = (60, 120)  # whole clip: frames between blinks, after the blink itself
STREAM_BLINK_GAP = (40, 100)  # streaming: frames from the last blink
BLINK_DETECT = 0.5
BROW_SEGMENT = 150
BROW_VOLUME = 0.08
BROW_MIN_RUN = 6
BROW_HOLD_RUN = 10
BROW_STRENGTH = (0.7, 1.3)


def find_silent_runs(
    volume: np.ndarray, threshold: float = SILENCE_THRESHOLD, min_length: int = MIN_SILENCE_FRAMES
) -> list[np.ndarray]:
    """Runs of consecutive frames with ``volume < threshold`` that are long enough.

    Reproduces the reference exactly, quirk included: the first run in the
    array is counted one frame short, so it needs ``min_length + 1`` frames.
    """
    idx = np.flatnonzero(np.asarray(volume) < threshold)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    runs = np.split(idx, breaks)
    return [run for i, run in enumerate(runs) if len(run) - (1 if i == 0 else 0) >= min_length]


def damp_silent_mouth(
    frames: np.ndarray,
    volume: np.ndarray,
    processed_frames: int = 0,
    threshold: float = SILENCE_THRESHOLD,
    min_length: int = MIN_SILENCE_FRAMES,
    edge_blend: int = SILENCE_EDGE_BLEND,
) -> np.ndarray:
    """Scale the mouth channels by 0.1 in silent runs and blend the runs' edges.

    Every qualifying run in ``frames`` is damped; the blend into a run never
    reaches back before ``processed_frames`` (the frames already sent).
    """
    out = np.array(frames, copy=True)
    n = out.shape[0]
    for run in find_silent_runs(volume, threshold, min_length):
        run = run[run < n]
        if run.size == 0:
            continue
        start, end = int(run[0]), int(run[-1])  # a run is consecutive frames: a slice
        out[start : end + 1, MOUTH_GROUP] *= SILENCE_MOUTH_FACTOR
        k = min(edge_blend, start - processed_frames)
        if k > 0:
            keep, take = _blend_weights(k)
            out[start : start + k] = out[start - 1] * keep + out[start : start + k] * take
        k = min(edge_blend, n - end - 1)
        if k > 0:
            keep, take = _blend_weights(k)
            rows = slice(end, end - k, -1)  # end, end-1, ...: the weights grow away from the edge
            out[rows] = out[end + 1] * keep + out[rows] * take
    return out


@lru_cache(maxsize=8)
def _blend_weights(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row weights ``1 - w`` and ``w``, ``w = (i+1)/(k+1)``, as float32 columns:
    the values numpy would use for each Python-float weight on float32 rows.
    Cached (k is at most a few frames), so read-only."""
    w = [(i + 1) / (k + 1) for i in range(k)]
    keep = np.array([1 - x for x in w], dtype=np.float32)[:, None]
    take = np.array(w, dtype=np.float32)[:, None]
    keep.setflags(write=False)
    take.setflags(write=False)
    return keep, take


def blend_chunk_start(
    frames: np.ndarray,
    processed_frames: int,
    first_window: int = FIRST_CHUNK_BLEND,
    next_window: int = NEXT_CHUNK_BLEND,
) -> np.ndarray:
    """Blend the first new frames from the last sent frame (or from a neutral
    all-zero face on a session's first chunk), weights ``(i+1)/(k+1)``."""
    out = np.array(frames, copy=True)
    if processed_frames > 0:
        ref, window = out[processed_frames - 1].copy(), next_window
    else:
        ref, window = np.zeros_like(out[0]), first_window
    k = min(window, out.shape[0] - processed_frames)
    for i in range(max(k, 0)):
        w = (i + 1) / (k + 1)
        out[processed_frames + i] = ref * (1 - w) + out[processed_frames + i] * w
    return out


_SAVGOL_COEFFS = {(SAVGOL_WINDOW, SAVGOL_ORDER): savgol_coeffs(SAVGOL_WINDOW, SAVGOL_ORDER)}


def savgol_smooth(frames: np.ndarray, window: int = SAVGOL_WINDOW, order: int = SAVGOL_ORDER) -> np.ndarray:
    """Savitzky-Golay along time (float64, mode "mirror"), clipped to [0, 1].

    The same computation as ``scipy.signal.savgol_filter(..., mode="mirror")``
    with the filter's coefficients computed once instead of on every chunk.
    """
    x = np.asarray(frames)
    key = (window, order)
    if key not in _SAVGOL_COEFFS:
        _SAVGOL_COEFFS[key] = savgol_coeffs(window, order)
    smoothed = convolve1d(x.astype(np.float64), _SAVGOL_COEFFS[key], axis=0, mode="mirror")
    return np.clip(smoothed, 0.0, 1.0).astype(x.dtype)


def symmetrize(frames: np.ndarray) -> np.ndarray:
    """Set both channels of every left/right pair to their average."""
    out = np.array(frames, copy=True)
    left, right = SYMMETRIC_PAIRS[:, 0], SYMMETRIC_PAIRS[:, 1]
    mean = (out[:, left] + out[:, right]) / 2
    out[:, left] = mean
    out[:, right] = mean
    return out


def _write_blink(out: np.ndarray, start: int, rng: np.random.Generator) -> None:
    pattern = BLINK_PATTERNS[rng.integers(len(BLINK_PATTERNS))] * rng.uniform(*BLINK_SCALE)
    out[start : start + BLINK_LENGTH, EYE_BLINK_LEFT] = pattern
    out[start : start + BLINK_LENGTH, EYE_BLINK_RIGHT] = pattern


def clip_blinks(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Whole clip: replace both eyeBlink channels by random blinks, one at frame 0
    and then every ``7 + U[60, 120)`` frames."""
    out = np.array(frames, copy=True)
    n = out.shape[0]
    out[:, [EYE_BLINK_LEFT, EYE_BLINK_RIGHT]] = 0
    frame = 0
    while frame < n - BLINK_LENGTH:
        _write_blink(out, frame, rng)
        frame += BLINK_LENGTH + int(rng.integers(*CLIP_BLINK_GAP))
    return out


def stream_blinks(frames: np.ndarray, processed_frames: int, rng: np.random.Generator) -> np.ndarray:
    """Streaming: at most two blinks in the new frames, the first ``U[40, 100)``
    frames after the last blink seen in the previous frames, the second the
    same spacing after the first, both only where a whole blink fits.

    (The reference measures the first spacing from a wrongly computed index;
    this keeps its character, the spacing it means.)
    """
    out = np.array(frames, copy=True)
    n = out.shape[0]
    remaining = n - processed_frames
    if remaining <= BLINK_LENGTH:
        return out
    seen = np.flatnonzero(out[:processed_frames, EYE_BLINK_LEFT] > BLINK_DETECT)
    since_last = processed_frames - 1 - int(seen[-1]) if seen.size else processed_frames
    first = max(0, int(rng.integers(*STREAM_BLINK_GAP)) - since_last)
    if first > remaining - BLINK_LENGTH:
        return out
    start = processed_frames + first
    _write_blink(out, start, rng)
    end = start + BLINK_LENGTH
    gap = int(rng.integers(*STREAM_BLINK_GAP))
    if n - end - BLINK_LENGTH > gap:
        _write_blink(out, end + gap, rng)
    return out


def brow_movement(frames: np.ndarray, volume: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add one brow raise per 150-frame segment, on a random loud run
    (volume > 0.08 for at least 6 frames), held while a long run lasts."""
    out = np.array(frames, copy=True)
    volume = np.asarray(volume)[: out.shape[0]]
    for seg_start in range(0, len(volume), BROW_SEGMENT):
        seg_end = min(seg_start + BROW_SEGMENT, len(volume))
        seg_volume = volume[seg_start:seg_end]
        labels, count = label(seg_volume > BROW_VOLUME)
        runs = [r for r in (np.flatnonzero(labels == i) for i in range(1, count + 1)) if len(r) >= BROW_MIN_RUN]
        if not runs:
            continue
        run = runs[rng.integers(len(runs))]
        run_len = int(run[-1] - run[0] + 1)
        curve = BROW_CURVES[rng.integers(len(BROW_CURVES))]
        peak = int(np.argmax(curve[:, 2]))
        if run_len > BROW_HOLD_RUN:
            local_peak = int(seg_volume[run].argmax())
            peak_frame = seg_start + int(run[local_peak])
            rise = curve[: peak + 1]
            start = max(peak_frame - peak, seg_start)
            end = min(peak_frame + (run_len - local_peak), seg_end)
            strength = rng.uniform(*BROW_STRENGTH)
            if start + len(rise) <= seg_end:
                out[start : start + len(rise), :5] += rise * strength
                hold = end - (start + len(rise))
                if hold > 0:
                    out[start + len(rise) : end, :5] += curve[peak] * strength
        else:
            pos = seg_start + int(run[0]) + (run_len - len(curve)) // 2
            pos = max(seg_start, min(pos, seg_end - len(curve)))
            if pos + len(curve) <= seg_end:
                out[pos : pos + len(curve), :5] += curve * rng.uniform(*BROW_STRENGTH)
    return np.clip(out, 0, 1)


def postprocess_clip(
    raw: np.ndarray,
    volume: np.ndarray,
    rng: np.random.Generator,
    movement_smooth: bool = False,
    brow: bool = False,
) -> np.ndarray:
    """Whole-clip pipeline: (damping) -> (brows) -> Savitzky-Golay -> symmetry -> blinks."""
    out = raw
    if movement_smooth:
        out = damp_silent_mouth(out, volume, 0)
    if brow:
        out = brow_movement(out, volume, rng)
    return clip_blinks(symmetrize(savgol_smooth(out)), rng)


def postprocess_chunk(
    previous: np.ndarray | None,
    previous_volume: np.ndarray | None,
    new: np.ndarray,
    new_volume: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Streaming pipeline for one chunk: the stored previous frames are prepended
    so that smoothing and blinks see them; only the new frames are returned."""
    if previous is None or len(previous) == 0:
        frames, volume, p = new, new_volume, 0
    else:
        frames = np.concatenate([previous, new], axis=0)
        volume = np.concatenate([previous_volume, new_volume], axis=0)
        p = len(previous)
    out = damp_silent_mouth(frames, volume, p)
    out = blend_chunk_start(out, p)
    out = savgol_smooth(out)
    out = symmetrize(out)
    out = stream_blinks(out, p, rng)
    return out[p:]
