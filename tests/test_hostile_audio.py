"""Audio built to hurt: decompression bombs, absurd headers and amplitudes,
audio shorter than the model's receptive field. Each is refused with a typed
error (a 4xx upstream) or answered, with bounded memory and no NaN."""

from __future__ import annotations

import io
import struct
import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from a2e import audio
from a2e.backend import TorchBackend
from a2e.clip import MIN_MODEL_SAMPLES, infer_clip
from a2e.constants import frame_count
from a2e.errors import AudioError, AudioTooLongError
from tests.conftest import DATA, wav_bytes


def silent(fmt: str, sr: int, channels: int, seconds: int, subtype: str | None = None) -> bytes:
    """Long silence compresses to almost nothing: the shape of a decompression bomb."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", sr, channels, format=fmt, subtype=subtype) as f:
        block = np.zeros((sr, channels), dtype=np.float32)
        for _ in range(seconds):
            f.write(block)
    return buf.getvalue()


def wav_header(sr: int, channels: int = 1, bits: int = 16, tag: int = 1, frames: int = 16) -> bytes:
    data = bytes(frames * channels * bits // 8)
    fmt = struct.pack("<HHIIHH", tag, channels, sr, sr * channels * bits // 8 % 2**32, channels * bits // 8, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_many_channels_at_a_high_rate_decode_in_bounded_memory():
    data = silent("FLAC", 192000, 8, 12)  # 18 M samples: 74 MB if decoded whole
    assert len(data) < 200_000
    tracemalloc.start()
    try:
        out = audio.load(data, max_seconds=600)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(out) == 12 * 16000
    assert peak < 12 * 2**20, f"peak {peak / 2**20:.1f} MiB"  # the 0.77 MB output plus a few blocks


def test_decoding_work_is_bounded_by_the_length_limit():
    # 8 channels at 192 kHz: 1.5 M samples per second of audio, 8x the budget
    with pytest.raises(AudioTooLongError, match="too much to decode"):
        audio.load(silent("OGG", 192000, 8, 1, "VORBIS"), max_seconds=2)  # 1 s: within the length limit


def test_the_limit_stops_decoding_when_the_header_does_not_say():
    data = bytearray(wav_bytes(np.zeros(16000 * 5, dtype=np.float32)))
    data[4:8] = data[40:44] = b"\xff\xff\xff\xff"  # sizes unknown, as streaming writers leave them
    with pytest.raises(AudioTooLongError):
        audio.load(bytes(data), max_seconds=2)


@pytest.mark.parametrize("sr", [0xFFFFFFFF, 655350, 10])
def test_sample_rates_out_of_range_are_refused(sr):
    with pytest.raises(AudioError, match="sample rate"):
        audio.load(wav_header(sr))


def test_too_many_channels_are_refused():
    with pytest.raises(AudioError, match="channels"):
        audio.load(wav_header(16000, channels=100))


@pytest.mark.parametrize("peak", [1e20, 1e30, 3e38])
def test_absurd_amplitudes_are_refused(peak):
    x = np.zeros(16000, dtype=np.float32)
    x[100:200] = peak
    with pytest.raises(AudioError, match="amplitude"):
        audio.load(wav_bytes(x, subtype="FLOAT"))


def test_loud_but_plausible_float_audio_passes():
    x = (4.0 * np.sin(np.arange(16000) / 5)).astype(np.float32)  # +12 dBFS: clipped in a DAW, still audio
    assert np.array_equal(audio.load(wav_bytes(x, subtype="FLOAT")), x)


def test_mp3_is_read_in_one_call_within_its_own_bound():
    # libsndfile's partial reads of gapless-tagged MP3s return wrong samples;
    # a one-call read equals soundfile's own whole read.
    x = (0.3 * np.sin(np.arange(48000 * 3) / 7)).astype(np.float32)
    data = wav_bytes(x, 48000, fmt="MP3")
    want = sf.read(io.BytesIO(data), dtype="float32")[0]
    mono, sr = audio.decode(data)
    assert sr == 48000 and np.array_equal(mono, want)
    stereo = wav_bytes(np.stack([x, x], 1), 48000, fmt="MP3")
    with pytest.raises(AudioTooLongError, match="MP3 is limited"):
        audio.load(stereo, max_seconds=2.5)  # 3 s of stereo: more than half the limit
    assert len(audio.load(wav_bytes(x, 48000, fmt="MP3"), max_seconds=3.5)) == 16000 * 3


def test_separation_input_keeps_two_channels_at_most_48k():
    x = np.random.default_rng(0).standard_normal((9600, 5)).astype(np.float32) * 0.1
    out, sr = audio.decode(wav_bytes(x, 96000, subtype="FLOAT"), mono=False, max_rate=48000)
    assert sr == 48000 and out.shape == (1, 4800)  # five channels averaged to one
    y = x[:, :2]
    out, sr = audio.decode(wav_bytes(y, 96000, subtype="FLOAT"), mono=False, max_rate=48000)
    assert sr == 48000 and out.shape == (2, 4800)
    assert np.allclose(out[0], audio.resample(y[:, 0], 96000, 48000), atol=1e-6)


def test_shared_clips_are_unchanged_by_block_decoding():
    data = (DATA / "Nangyanwen_chinese.wav").read_bytes()  # 44.1 kHz stereo, 16 s: several blocks
    with sf.SoundFile(io.BytesIO(data)) as f:
        whole = f.read(dtype="float32", always_2d=True).mean(axis=1, dtype=np.float32)
    assert np.array_equal(audio.load(data), audio.resample(whole, 44100))


@pytest.mark.parametrize("n", [1, 2, 100, 256, 257, 320, 399, MIN_MODEL_SAMPLES])
def test_clips_shorter_than_the_receptive_field_animate(model, n):
    backend = TorchBackend(model)
    x = np.full(n, 0.1, dtype=np.float32)
    out = infer_clip(backend, x, 0, np.random.default_rng(0))
    assert out.shape == (frame_count(n), 52) and np.isfinite(out).all()


def test_one_sample_wav_decodes():
    assert len(audio.load(wav_bytes(np.array([0.5], dtype=np.float32)))) == 1
    with pytest.raises(AudioError, match="no samples"):
        audio.load(wav_bytes(np.array([0.5], dtype=np.float32), 48000))  # nothing left at 16 kHz


def test_corrupt_checkpoint_names_the_damaged_record(checkpoint, tmp_path):
    import zipfile

    from a2e.checkpoint import read_state_dict

    with zipfile.ZipFile(checkpoint) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(checkpoint.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 64
    data[start : start + 256] = bytes(256)  # zero part of the largest tensor, as a bad copy would
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    with pytest.raises(Exception, match=f"record '{info.filename}'.*CRC-32"):
        read_state_dict(bad)
    assert len(read_state_dict(checkpoint)) > 0  # the intact file still loads
