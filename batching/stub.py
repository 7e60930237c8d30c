"""A stand-in model for measuring the serving path (``--model stub``):
constant frames at once, so every cost measured is the server's own."""

from __future__ import annotations

import math

import numpy as np

from a2e.constants import NUM_BLENDSHAPES, WINDOW_FRAMES


class StubRunner:
    num_identities = 12
    mode = "stub"
    interruptible = False  # answers at once: nothing to stop

    def run_windows(self, windows: np.ndarray, identities: np.ndarray) -> np.ndarray:
        return np.full((len(windows), WINDOW_FRAMES, NUM_BLENDSHAPES), 0.3, dtype=np.float32)

    def run_clip(self, audio: np.ndarray, identity: int) -> np.ndarray:
        return np.full((math.ceil(len(audio) / 16000 * 30), NUM_BLENDSHAPES), 0.3, dtype=np.float32)
