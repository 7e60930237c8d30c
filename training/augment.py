"""Augmentations that carry synthetic speech towards real recordings.

All take and return float32 mono audio at 16 kHz and draw from the
``numpy.random.Generator`` given; none changes timing, so targets stay valid.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
from scipy.signal import butter, fftconvolve, sosfilt

from a2e.audio import resample

SR = 16000


def gain(x: np.ndarray, rng: np.random.Generator, low_db: float = -30.0, high_db: float = 6.0) -> np.ndarray:
    return x * np.float32(10 ** (rng.uniform(low_db, high_db) / 20))


def noise(x: np.ndarray, rng: np.random.Generator, snr_db: tuple[float, float] = (5.0, 40.0)) -> np.ndarray:
    """White or pink-ish noise at a random SNR relative to the speech."""
    n = rng.standard_normal(len(x)).astype(np.float32)
    if rng.random() < 0.5:
        n = np.cumsum(n) * 0.02
        n -= np.convolve(n, np.ones(64) / 64, mode="same")
    p_sig = np.mean(x**2) + 1e-10
    p_noise = np.mean(n**2) + 1e-10
    snr = rng.uniform(*snr_db)
    return x + n * np.float32(np.sqrt(p_sig / (p_noise * 10 ** (snr / 10))))


def reverb(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A synthetic room: exponentially decaying noise, RT60 0.1-0.7 s."""
    rt60 = rng.uniform(0.1, 0.7)
    t = np.arange(int(rt60 * SR)) / SR
    ir = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60)
    ir[0] = 1.0
    ir /= np.sqrt(np.sum(ir**2))
    wet = fftconvolve(x, ir)[: len(x)].astype(np.float32)
    mix = rng.uniform(0.3, 1.0)
    return (1 - mix) * x + mix * wet


def telephone(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """300-3400 Hz band through an 8 kHz round trip."""
    sos = butter(4, [300, 3400], btype="bandpass", fs=SR, output="sos")
    y = sosfilt(sos, x).astype(np.float32)
    return resample(resample(y, SR, 8000), 8000, SR)[: len(x)]


def mp3_round_trip(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    buf = io.BytesIO()
    sf.write(buf, np.clip(x, -1, 1), SR, format="MP3", compression_level=float(rng.uniform(0.3, 0.99)))
    y, _ = sf.read(io.BytesIO(buf.getvalue()), dtype="float32")
    out = np.zeros_like(x)
    out[: min(len(x), len(y))] = y[: len(x)]
    return out


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random chain: each effect with its own probability, gain always."""
    if rng.random() < 0.3:
        x = reverb(x, rng)
    if rng.random() < 0.15:
        x = telephone(x, rng)
    if rng.random() < 0.5:
        x = noise(x, rng)
    x = gain(x, rng)
    return np.clip(x, -1, 1).astype(np.float32)
