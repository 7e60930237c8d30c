"""Fixed facts of the LAM-A2E contract: rates, window sizes and the ARKit tables.

The tables come from ``data/lam_a2e_constants.json`` (a copy of the model
spec's constants) so there is exactly one source for names and curves.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
FPS = 30
# A streaming window always holds 64 output frames' worth of 16 kHz audio.
WINDOW_FRAMES = 64
WINDOW_SAMPLES = SAMPLE_RATE * WINDOW_FRAMES // FPS  # 34133
# Samples per volume frame (RMS frame and hop) at 16 kHz.
VOLUME_HOP = SAMPLE_RATE // FPS  # 533
# Weights leave the server with 6 decimals, whatever the door or the format:
# 100x finer than the 1e-4 the outputs are reproduced to, and half the bytes
# of full doubles. A stored answer keeps exactly that much.
WEIGHT_DECIMALS = 6

_DATA = json.loads((Path(__file__).parent / "data" / "lam_a2e_constants.json").read_text())

ARKIT_NAMES: tuple[str, ...] = tuple(_DATA["arkit_names"])
NUM_BLENDSHAPES = len(ARKIT_NAMES)
_INDEX = {name: i for i, name in enumerate(ARKIT_NAMES)}

SYMMETRIC_PAIRS: np.ndarray = np.array(
    [(_INDEX[left], _INDEX[right]) for left, right in _DATA["symmetric_pairs"]], dtype=np.intp
)
MOUTH_GROUP: np.ndarray = np.array([_INDEX[name] for name in _DATA["mouth_group"]], dtype=np.intp)
BLINK_PATTERNS: np.ndarray = np.array(_DATA["blink_patterns"], dtype=np.float64)
# Only the first two curves are used by the reference's brow movement.
BROW_CURVES: tuple[np.ndarray, ...] = (
    np.array(_DATA["brow_curves"]["BROW1"], dtype=np.float64),
    np.array(_DATA["brow_curves"]["BROW2"], dtype=np.float64),
)
EYE_BLINK_LEFT = _INDEX["eyeBlinkLeft"]
EYE_BLINK_RIGHT = _INDEX["eyeBlinkRight"]
BLINK_LENGTH = BLINK_PATTERNS.shape[1]


def frame_count(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Output frames for ``num_samples`` of audio: ``ceil(N / sr * 30)`` in floating point."""
    return math.ceil(num_samples / sample_rate * FPS)


def channel_index(name: str) -> int:
    """Index of an ARKit channel by name."""
    return _INDEX[name]
