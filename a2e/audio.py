"""Audio front-end: bytes in any common container -> mono float32 at 16 kHz.

Decoding is by content (libsndfile sniffs the format), never by file name:
clients upload MP3s named ``.wav``. Resampling uses soxr at high quality,
the resampler librosa (the reference's loader) uses by default. torchaudio is
deliberately not used (see README, "Why no torchaudio").
"""

from __future__ import annotations

import io
import math

import numpy as np
import soundfile as sf
import soxr

from .constants import SAMPLE_RATE, VOLUME_HOP
from .errors import AudioError, AudioTooLongError

# libsndfile reports MP3 frames a little generously; allow a tiny slack
# before calling an upload too long by its header alone.
_HEADER_SLACK = 1.05
_RMS_BLOCK = 2048


def decode(data: bytes, max_seconds: float | None = None, mono: bool = True) -> tuple[np.ndarray, int]:
    """Decode ``data`` to a mono float32 array at its own sample rate
    (``[channels, N]`` when ``mono`` is false).

    Raises AudioError (empty, undecodable, no samples, non-finite) or
    AudioTooLongError (longer than ``max_seconds``).
    """
    if not data:
        raise AudioError("audio is empty (0 bytes)")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr = int(f.samplerate)
            if max_seconds is not None and f.frames > 0 and f.frames / sr > max_seconds * _HEADER_SLACK:
                raise AudioTooLongError(f"audio is {f.frames / sr:.1f} s long; the limit is {max_seconds:g} s")
            samples = f.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        # libsndfile's message names the in-memory file object; keep only its reason.
        reason = str(exc).rsplit(">: ", 1)[-1]
        raise AudioError(
            f"audio could not be decoded (supported: WAV, FLAC, OGG/Vorbis, OGG/Opus, MP3; raw PCM needs a "
            f"header, e.g. write it as WAV): {reason}"
        ) from None
    if samples.size == 0 or sr <= 0:
        raise AudioError("audio has no samples")
    if not np.isfinite(samples).all():
        raise AudioError("audio contains non-finite samples (NaN or infinity)")
    if max_seconds is not None and len(samples) / sr > max_seconds:
        raise AudioTooLongError(f"audio is {len(samples) / sr:.1f} s long; the limit is {max_seconds:g} s")
    if not mono:
        return np.ascontiguousarray(samples.T, dtype=np.float32), sr
    out = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    return np.ascontiguousarray(out, dtype=np.float32), sr


def resample(audio: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample mono float32 audio with soxr (high quality); a no-op copy at equal rates."""
    if orig_sr == target_sr:
        return np.array(audio, dtype=np.float32, copy=True)
    out = soxr.resample(np.asarray(audio, dtype=np.float32), orig_sr, target_sr, quality="HQ")
    return np.ascontiguousarray(out, dtype=np.float32)


def load(data: bytes, max_seconds: float | None = None) -> np.ndarray:
    """Decode and resample to the model's 16 kHz mono float32."""
    audio, sr = decode(data, max_seconds=max_seconds)
    return resample(audio, sr)


def rms_volume(audio: np.ndarray, sr: int = SAMPLE_RATE, frame_length: int | None = None) -> np.ndarray:
    """Per-frame RMS at 30 fps, with librosa's ``feature.rms`` conventions.

    Frames of ``frame_length`` samples (default ``int(sr/30)``), hop ``int(sr/30)``,
    centred (half a frame of zeros padded at both ends), cut to ``ceil(len/sr*30)``
    values; accumulated in float32 as librosa does.
    """
    hop = int(sr / 30) if sr != SAMPLE_RATE else VOLUME_HOP
    frame_length = hop if frame_length is None else frame_length
    x = np.asarray(audio, dtype=np.float32)
    pad = frame_length // 2
    n = 1 + (len(x) + 2 * pad - frame_length) // hop if len(x) + 2 * pad >= frame_length else 0
    n = min(n, math.ceil(len(x) / sr * 30))
    volume = np.empty(max(n, 0), dtype=np.float32)
    # Blocks of frames, so a long clip never needs a padded copy or a
    # [frames, frame_length] scratch array of its whole length.
    for b0 in range(0, n, _RMS_BLOCK):
        b1 = min(n, b0 + _RMS_BLOCK)
        lo, hi = b0 * hop - pad, (b1 - 1) * hop + frame_length - pad
        seg = x[max(lo, 0) : max(min(hi, len(x)), 0)]
        seg = np.pad(seg, (max(0, -lo), max(0, hi - len(x))))
        frames = np.lib.stride_tricks.sliding_window_view(seg, frame_length)[::hop][: b1 - b0]
        power = np.mean(np.square(frames, dtype=np.float32), axis=1, dtype=np.float32)
        volume[b0:b1] = np.sqrt(power)
    return volume
