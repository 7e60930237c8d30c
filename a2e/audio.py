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
    fast = _read_plain_wav(data)
    if fast is not None:
        return _finish(*fast, max_seconds, mono)
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
    return _finish(samples, sr, max_seconds, mono)


def _finish(samples: np.ndarray, sr: int, max_seconds: float | None, mono: bool) -> tuple[np.ndarray, int]:
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


_WAV_INT = {1: (np.uint8, 128.0, 128.0), 2: (np.dtype("<i2"), 0.0, 32768.0), 4: (np.dtype("<i4"), 0.0, 2147483648.0)}


def _read_plain_wav(data: bytes) -> tuple[np.ndarray, int] | None:
    """Plain RIFF/WAVE (PCM 8/16/24/32-bit or float) read straight from the bytes.

    Streaming clients send small WAV chunks by the thousand; libsndfile reads
    from memory through Python callbacks, which costs more than the whole
    decode. Anything unusual returns None and goes to libsndfile instead.
    Conversion to float matches libsndfile's (x / 2**(bits-1)).
    """
    if len(data) < 44 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, fmt, payload = 12, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = pos + 8
        if cid == b"fmt " and size >= 16:
            fmt = data[body : body + min(size, 40)]
        elif cid == b"data":
            payload = data[body : body + size] if body + size <= len(data) else data[body:]
            break
        pos = body + size + (size & 1)
    if fmt is None or payload is None:
        return None
    tag = int.from_bytes(fmt[0:2], "little")
    channels = int.from_bytes(fmt[2:4], "little")
    sr = int.from_bytes(fmt[4:8], "little")
    bits = int.from_bytes(fmt[14:16], "little")
    if tag == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the sub-format says PCM or float
        tag = int.from_bytes(fmt[24:26], "little")
    width = bits // 8
    if channels < 1 or sr <= 0 or bits % 8 or width == 0:
        return None
    usable = len(payload) - len(payload) % (width * channels)
    raw = payload[:usable]
    if tag == 3 and bits in (32, 64):
        x = np.frombuffer(raw, dtype="<f4" if bits == 32 else "<f8").astype(np.float32)
    elif tag == 1 and width in _WAV_INT:
        dtype, offset, scale = _WAV_INT[width]
        x = ((np.frombuffer(raw, dtype=dtype).astype(np.float32) - offset) / scale).astype(np.float32)
    elif tag == 1 and width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8  # sign-extend through the top byte
        x = (v.astype(np.float32) / 2147483648.0).astype(np.float32)
    else:
        return None
    return x.reshape(-1, channels), sr


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
