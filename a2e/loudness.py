"""Loudness (ITU-R BS.1770 integrated loudness, via pyloudnorm) and the two
documented ways to make animation robust to recording level.

The reference's volume gates use fixed RMS thresholds (mouth damping below
0.001, brows above 0.08), and the model's output itself depends on input
level, so a quiet and a loud recording of the same speech animate
differently. Modes:

* ``off`` (default, and always in the ``reference`` context mode): exactly the
  reference's computation.
* ``gates``: the model sees the audio as it is; the volume that drives the
  gates is scaled as if the audio were at the target loudness.
* ``normalize``: the model input (and so the volume) is scaled to the target
  loudness.

Gains are limited to +-30 dB. pyloudnorm needs at least one 400 ms block:
shorter or silent audio gets no estimate and gain 1 (or, in a stream, keeps
the gain it had).
"""

from __future__ import annotations

from enum import Enum

import numpy as np

from .constants import SAMPLE_RATE

MIN_SECONDS = 0.4
DEFAULT_TARGET_LUFS = -21.0  # the middle of the shared speech clips (-24 to -19 LUFS)
MAX_GAIN_DB = 30.0
STREAM_HISTORY_S = 8.0
STREAM_SMOOTHING = 0.3  # share of a new estimate taken per chunk


class LoudnessMode(str, Enum):
    OFF = "off"
    GATES = "gates"
    NORMALIZE = "normalize"


_METERS: dict[int, object] = {}


def integrated_loudness(audio: np.ndarray, sr: int = SAMPLE_RATE) -> float | None:
    """Integrated loudness in LUFS, or None for audio shorter than 0.4 s or silent."""
    import pyloudnorm

    x = np.asarray(audio, dtype=np.float64)
    if len(x) < MIN_SECONDS * sr:
        return None
    meter = _METERS.setdefault(sr, pyloudnorm.Meter(sr))
    with np.errstate(divide="ignore"):
        value = float(meter.integrated_loudness(x))
    return value if np.isfinite(value) else None


def gain_db_for(lufs: float | None, target_lufs: float = DEFAULT_TARGET_LUFS) -> float:
    if lufs is None:
        return 0.0
    return float(np.clip(target_lufs - lufs, -MAX_GAIN_DB, MAX_GAIN_DB))


def db_to_gain(db: float) -> float:
    return float(10.0 ** (db / 20.0))


def clip_gain(audio: np.ndarray, target_lufs: float = DEFAULT_TARGET_LUFS, sr: int = SAMPLE_RATE) -> float:
    """Linear gain that brings a whole clip to ``target_lufs`` (1.0 when it cannot be measured)."""
    return db_to_gain(gain_db_for(integrated_loudness(audio, sr), target_lufs))


class StreamLoudness:
    """A per-session loudness estimate that is stable from chunk to chunk:
    measured over the session's last 8 s, and moved only part of the way
    towards each new estimate."""

    def __init__(self, target_lufs: float = DEFAULT_TARGET_LUFS) -> None:
        self.target_lufs = target_lufs
        self.history = np.zeros(0, dtype=np.float32)
        self.gain_db: float | None = None

    def update(self, chunk: np.ndarray) -> float:
        """Take a 16 kHz chunk; returns the linear gain for it."""
        keep = int(STREAM_HISTORY_S * SAMPLE_RATE)
        self.history = np.concatenate([self.history, np.asarray(chunk, dtype=np.float32)])[-keep:]
        lufs = integrated_loudness(self.history)
        if lufs is not None:
            new = gain_db_for(lufs, self.target_lufs)
            self.gain_db = new if self.gain_db is None else self.gain_db + STREAM_SMOOTHING * (new - self.gain_db)
        return db_to_gain(self.gain_db or 0.0)
