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
    NUM_BLENDSHAPES,
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
# Stored frames a chunk's new frames can depend on: smoothing reads two back,
# the chunk-start blend one, and a blend out of a silent run ending there
# reads forward up to three frames.
_FRAMES_BACK = SAVGOL_WINDOW // 2 + SILENCE_EDGE_BLEND
_EYES = [EYE_BLINK_LEFT, EYE_BLINK_RIGHT]


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
    ``frames [..., T, 52]`` with ``volume [..., V]``: a batch of sessions is
    damped at once, each row exactly as alone. (Runs cannot touch each other's
    rows: a run is at least 7 frames and ends at a loud frame, which is what
    the blends read, so all runs are scaled first and then blended.)
    """
    out = np.array(frames, copy=True)
    rows = out.reshape(-1, *out.shape[-2:])
    runs = silent_runs(volume, rows.shape[1], processed_frames, threshold, min_length, edge_blend)
    _damp_runs(rows, runs, mouth=True)
    return out


def silent_runs(
    volume: np.ndarray,
    frames: int,
    processed_frames: int = 0,
    threshold: float = SILENCE_THRESHOLD,
    min_length: int = MIN_SILENCE_FRAMES,
    edge_blend: int = SILENCE_EDGE_BLEND,
) -> tuple[np.ndarray, ...]:
    """The runs ``damp_silent_mouth`` damps in a ``[rows, V]`` volume whose
    first ``frames`` frames exist: each run's row, start, stop (one past its
    end), and the lengths of its blends into and out of it (0: none)."""
    silent = np.asarray(volume).reshape(-1, np.shape(volume)[-1]) < threshold
    edges = np.diff(silent.astype(np.int8), prepend=np.int8(0), append=np.int8(0), axis=1)
    row, starts = np.nonzero(edges == 1)
    stops = np.nonzero(edges == -1)[1]  # one past each run, in the same order
    first = np.ones(len(row), dtype=bool)
    first[1:] = row[1:] != row[:-1]
    keep = (stops - starts - first >= min_length) & (starts < frames)  # the reference's quirk: a row's first run counts one short
    row, starts, stops = row[keep], starts[keep], np.minimum(stops[keep], frames)
    into = np.minimum(np.minimum(edge_blend, starts - processed_frames), stops - starts)
    out_of = np.minimum(edge_blend, frames - stops)
    return row, starts, stops, into, out_of


def _damp_runs(rows: np.ndarray, runs: tuple[np.ndarray, ...], mouth: bool, offset: int = 0) -> None:
    """Apply ``silent_runs`` to ``rows [B, T, C]`` in place: scale the mouth
    (when ``rows`` has every channel), then blend into and out of each run.
    ``rows`` may hold only the frames from ``offset`` on; a blend that would
    reach before them is left out."""
    row, starts, stops, into, out_of = runs
    if row.size == 0:
        return
    n = offset + rows.shape[1]
    if mouth:
        delta = np.zeros((len(rows), n + 1), dtype=np.int32)
        delta[row, starts] += 1
        delta[row, stops] -= 1
        inside = np.cumsum(delta[:, :n], axis=1)[:, offset:] > 0
        scaled = rows[:, :, MOUTH_GROUP]
        scaled[inside] *= SILENCE_MOUTH_FACTOR
        rows[:, :, MOUTH_GROUP] = scaled
    # Blend into each run from the frame before it (these start after the
    # frames already sent, so after ``offset``), and out of it towards the
    # frame after it.
    for k in np.unique(into[into > 0]).tolist():
        keep_w, take_w = _blend_weights(k)
        sel = into == k
        r, s = row[sel], starts[sel] - offset
        at = s[:, None] + np.arange(k)
        rows[r[:, None], at] = rows[r, s - 1][:, None, :] * keep_w + rows[r[:, None], at] * take_w
    for k in np.unique(out_of[out_of > 0]).tolist():
        keep_w, take_w = _blend_weights(k)
        sel = (out_of == k) & (stops - k >= offset)
        r, e = row[sel], stops[sel] - 1 - offset
        at = e[:, None] - np.arange(k)  # end, end-1, ...: the weights grow away from the edge
        rows[r[:, None], at] = rows[r, e + 1][:, None, :] * keep_w + rows[r[:, None], at] * take_w


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
    all-zero face on a session's first chunk), weights ``(i+1)/(k+1)``.
    ``frames`` is ``[..., T, 52]``: leading axes (a batch of sessions) are
    blended alike, each row exactly as on its own."""
    out = np.array(frames, copy=True)
    if processed_frames > 0:
        ref, window = out[..., processed_frames - 1, :].copy(), next_window
    else:
        ref, window = np.zeros_like(out[..., 0, :]), first_window
    k = min(window, out.shape[-2] - processed_frames)
    for i in range(max(k, 0)):
        w = (i + 1) / (k + 1)
        out[..., processed_frames + i, :] = ref * (1 - w) + out[..., processed_frames + i, :] * w
    return out


_SAVGOL_COEFFS = {(SAVGOL_WINDOW, SAVGOL_ORDER): savgol_coeffs(SAVGOL_WINDOW, SAVGOL_ORDER)}


def savgol_smooth(
    frames: np.ndarray, window: int = SAVGOL_WINDOW, order: int = SAVGOL_ORDER, start: int = 0
) -> np.ndarray:
    """Savitzky-Golay along time (axis -2; float64, mode "mirror"), clipped to [0, 1];
    the smoothed frames from ``start`` on (those before it are read, not returned).

    Bit for bit ``scipy.signal.savgol_filter(..., mode="mirror")``, whose
    ``correlate1d`` treats these (symmetric) coefficients as centre tap plus
    mirrored pairs, outermost pair first; written out here because scipy's
    line-by-line pass over a ``[B, T, 52]`` batch costs several times the
    arithmetic. Each row of a batch gets what it gets alone.
    """
    x = np.asarray(frames)
    key = (window, order)
    if key not in _SAVGOL_COEFFS:
        _SAVGOL_COEFFS[key] = savgol_coeffs(window, order)
    w = _SAVGOL_COEFFS[key]
    half = window // 2
    t = x.shape[-2]
    if t <= half:  # shorter than the mirror: scipy's own extension rules
        smoothed = convolve1d(x.astype(np.float64), w, axis=-2, mode="mirror")
        return np.clip(smoothed, 0.0, 1.0).astype(x.dtype)[..., start:, :]
    padded = np.empty((*x.shape[:-2], t + 2 * half, x.shape[-1]), dtype=np.float64)
    padded[..., half : half + t, :] = x
    for j in range(1, half + 1):  # mirror about the first and last frames
        padded[..., half - j, :] = padded[..., half + j, :]
        padded[..., half + t - 1 + j, :] = padded[..., half + t - 1 - j, :]
    m = t - start
    smoothed = padded[..., start + half : start + half + m, :] * w[half]
    for j in range(half, 0, -1):
        lo, hi = start + half - j, start + half + j
        smoothed += (padded[..., lo : lo + m, :] + padded[..., hi : hi + m, :]) * w[half + j]
    return np.clip(smoothed, 0.0, 1.0, out=smoothed).astype(x.dtype)


def symmetrize(frames: np.ndarray) -> np.ndarray:
    """Set both channels of every left/right pair to their average (any leading axes)."""
    out = np.array(frames, copy=True)
    left, right = SYMMETRIC_PAIRS[:, 0], SYMMETRIC_PAIRS[:, 1]
    mean = (out[..., left] + out[..., right]) / 2
    out[..., left] = mean
    out[..., right] = mean
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
    seen = out[None, :processed_frames, EYE_BLINK_LEFT] > BLINK_DETECT
    _stream_blinks_into(out[None, processed_frames:], seen, [rng])
    return out


def _stream_blinks_into(new: np.ndarray, seen: np.ndarray, rngs: list[np.random.Generator]) -> None:
    """``stream_blinks`` for B sessions, in place on their new frames
    ``[B, n, 52]``; ``seen [B, p]`` marks the previous frames that show a
    blink. Row b draws from ``rngs[b]``."""
    n = new.shape[1]
    if n <= BLINK_LENGTH:
        return
    p = seen.shape[1]
    # Frames since each row's last blink (all previous frames when none).
    since = np.argmax(seen[:, ::-1], axis=1) if p else np.zeros(len(new), dtype=np.int64)
    since = np.where(seen.any(axis=1), since, p)
    for row, rng, since_last in zip(new, rngs, since.tolist()):
        first = max(0, int(rng.integers(*STREAM_BLINK_GAP)) - since_last)
        if first > n - BLINK_LENGTH:
            continue
        _write_blink(row, first, rng)
        end = first + BLINK_LENGTH
        gap = int(rng.integers(*STREAM_BLINK_GAP))
        if n - end - BLINK_LENGTH > gap:
            _write_blink(row, end + gap, rng)


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
        return postprocess_chunks(None, None, new[None], new_volume[None], [rng])[0]
    return postprocess_chunks(previous[None], previous_volume[None], new[None], new_volume[None], [rng])[0]


def postprocess_chunks(
    previous: np.ndarray | None,
    previous_volume: np.ndarray | None,
    new: np.ndarray,
    new_volume: np.ndarray,
    rngs: list[np.random.Generator],
) -> np.ndarray:
    """``postprocess_chunk`` for B sessions at once, all with the same number of
    stored frames ``p`` (``previous [B, p, 52]``, or None when p = 0) and of new
    frames ``n`` (``new [B, n, 52]``, volumes ``[B, p]`` and ``[B, n]``); row b
    draws from ``rngs[b]``. Returns ``[B, n, 52]``, each row exactly what
    ``postprocess_chunk`` returns for it alone: damping, blend, smoothing and
    symmetry run over the whole batch, only the blinks' random draws are per
    session. An engine's post-processing CPU per chunk falls with the
    batch size this way."""
    if previous is None or previous.shape[1] == 0:
        frames, volume, p = np.array(new, copy=True), new_volume, 0
        eyes = np.zeros((len(new), 0, 2), dtype=new.dtype)
    else:
        p = previous.shape[1]
        frames = np.concatenate([previous[:, p - min(p, _FRAMES_BACK) :], new], axis=1)
        volume = np.concatenate([previous_volume, new_volume], axis=1)
        eyes = np.concatenate([previous[..., _EYES], new[..., _EYES]], axis=1)
    # Only the last _FRAMES_BACK stored frames can reach the new ones (the
    # blends read one frame back, smoothing two), so only they go through
    # the whole pipeline; silent runs are still found in the whole volume.
    # Blinks read the stored frames' eyes, which only the runs' blends change.
    back = frames.shape[1] - new.shape[1]
    runs = silent_runs(volume, p + new.shape[1], p)
    _damp_runs(frames, runs, mouth=True, offset=p - back)
    out = blend_chunk_start(frames, back)
    new_out = symmetrize(savgol_smooth(out, start=back))
    half = SAVGOL_WINDOW // 2
    if p:
        _damp_runs(eyes, runs, mouth=False)
    eyes = savgol_smooth(np.concatenate([eyes[:, :p], out[:, back : back + half, _EYES]], axis=1))[:, :p]
    seen = (eyes[..., 0] + eyes[..., 1]) / 2 > BLINK_DETECT
    _stream_blinks_into(new_out, seen, rngs)
    return new_out


def history_parts(previous: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What later chunks read of a session's stored frames ``[p, 52]``: the
    last ``_FRAMES_BACK`` frames whole, and the eyes of all of them (blinks
    look back the whole way). A store keeps these 1.5 KB instead of the
    13 KB of 64 whole frames."""
    return np.array(previous[-_FRAMES_BACK:], copy=True), np.array(previous[:, _EYES], copy=True)


def history_from_parts(tail: np.ndarray, eyes: np.ndarray) -> np.ndarray:
    """Stored frames that post-process exactly as those ``history_parts`` was
    given (the channels no later chunk reads are zero)."""
    frames = np.zeros((len(eyes), NUM_BLENDSHAPES), dtype=eyes.dtype)
    frames[:, _EYES] = eyes
    frames[len(frames) - len(tail) :] = tail
    return frames
