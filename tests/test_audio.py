"""Decoding by content, resampling, volume, and typed rejection of bad input."""

import io
import math

import numpy as np
import pytest
import soundfile as sf

from a2e import audio
from a2e.errors import AudioError, AudioTooLongError
from tests.conftest import DATA, wav_bytes

# name: (source rate, source frames, samples after resampling to 16 kHz)
CLIPS = {
    "BarackObama_english.wav": (16000, 127925, 127925),  # 8.00 s, stereo
    "FangXiao_japanese.wav": (48000, 468864, 156288),  # 9.77 s, stereo
    "LinJing_TTS_chinese.wav": (48000, 293760, 97920),  # 6.12 s, an MP3 named .wav
    "Nangyanwen_chinese.wav": (44100, 712792, 258609),  # 16.16 s, stereo
}


@pytest.mark.parametrize("name", sorted(CLIPS))
def test_shared_clips_decode_and_resample(name):
    data = (DATA / name).read_bytes()
    mono, sr = audio.decode(data)
    want_sr, want_frames, want_16k = CLIPS[name]
    assert sr == want_sr
    assert mono.ndim == 1 and mono.dtype == np.float32
    assert len(mono) == want_frames
    out = audio.load(data)
    assert out.dtype == np.float32
    assert len(out) == want_16k
    assert 0.05 < np.abs(out).max() <= 1.0


def test_mp3_named_wav_is_decoded_by_content():
    data = (DATA / "LinJing_TTS_chinese.wav").read_bytes()
    assert data[:3] == b"ID3"  # it really is an MP3
    mono, sr = audio.decode(data)
    assert sr == 48000
    assert 6.0 < len(mono) / sr < 6.2


def test_stereo_is_averaged():
    left = np.full(1600, 0.5, dtype=np.float32)
    right = np.full(1600, -0.1, dtype=np.float32)
    mono, sr = audio.decode(wav_bytes(np.stack([left, right], 1), 16000, subtype="FLOAT"))
    assert np.allclose(mono, 0.2)


@pytest.mark.parametrize("fmt,subtype", [("FLAC", None), ("OGG", "VORBIS"), ("OGG", "OPUS"), ("MP3", None)])
def test_other_containers(fmt, subtype):
    t = np.arange(48000) / 48000
    x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    mono, sr = audio.decode(wav_bytes(x, 48000, fmt=fmt, subtype=subtype))
    assert sr == 48000
    assert abs(len(mono) - 48000) < 4000


def test_resample_preserves_a_tone():
    sr = 44100
    t = np.arange(sr) / sr
    x = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    y = audio.resample(x, sr)
    assert len(y) == 16000
    spectrum = np.abs(np.fft.rfft(y[1000:-1000]))
    freqs = np.fft.rfftfreq(len(y) - 2000, 1 / 16000)
    assert abs(freqs[spectrum.argmax()] - 1000) < 2


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "empty"),
        (b"This is not an audio file", "could not be decoded"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "could not be decoded"),
    ],
)
def test_bad_bytes(data, message):
    with pytest.raises(AudioError, match=message):
        audio.decode(data)


def test_truncated_wav_header_only():
    good = wav_bytes(np.zeros(16000, dtype=np.float32))
    with pytest.raises(AudioError):
        audio.decode(good[:30])


def test_no_samples():
    with pytest.raises(AudioError, match="no samples"):
        audio.decode(wav_bytes(np.zeros(0, dtype=np.float32)))


def test_non_finite():
    x = np.zeros(1600, dtype=np.float32)
    x[10] = np.nan
    with pytest.raises(AudioError, match="non-finite"):
        audio.decode(wav_bytes(x, subtype="FLOAT"))


def test_too_long_is_typed():
    x = np.zeros(16000 * 3, dtype=np.float32)
    with pytest.raises(AudioTooLongError, match="limit is 2 s"):
        audio.decode(wav_bytes(x), max_seconds=2)
    mono, _ = audio.decode(wav_bytes(x), max_seconds=3)
    assert len(mono) == 48000


def test_rms_volume_matches_definition():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(16000).astype(np.float32) * 0.1
    vol = audio.rms_volume(x)
    assert len(vol) == 30
    hop = 533
    padded = np.pad(x, (266, 266))
    for i in (0, 1, 15, 29):
        frame = padded[i * hop : i * hop + hop].astype(np.float64)
        assert vol[i] == pytest.approx(math.sqrt(np.mean(frame**2)), rel=1e-5)


def test_rms_volume_short_frame_for_short_chunks():
    x = np.full(300, 0.5, dtype=np.float32)
    vol = audio.rms_volume(x, frame_length=300)
    assert len(vol) == math.ceil(300 / 16000 * 30)
    assert vol[0] == pytest.approx(math.sqrt(0.25 * 150 / 300), rel=1e-5)



@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
@pytest.mark.parametrize("channels", [1, 2, 3])
def test_plain_wav_fast_path_equals_libsndfile(subtype, channels):
    rng = np.random.default_rng(channels)
    x = np.clip(rng.standard_normal((4801, channels)) * 0.3, -1, 1).astype(np.float32)
    data = wav_bytes(x, 22050, subtype=subtype)
    src = audio._plain_wav(data)
    assert src is not None  # 3 channels are written as WAVE_FORMAT_EXTENSIBLE
    with sf.SoundFile(io.BytesIO(data)) as f:
        want = f.read(dtype="float32", always_2d=True)
    assert (src.sample_rate, src.channels, src.frames) == (22050, channels, 4801)
    fast = np.concatenate(list(src.blocks()))
    assert fast.shape == want.shape
    assert np.array_equal(fast, want)


def test_fast_path_skips_extra_chunks_and_falls_back_when_unsure():
    x = (np.sin(np.arange(1600) / 10) * 0.5).astype(np.float32)
    data = wav_bytes(x, subtype="PCM_16")
    # a LIST chunk before the data chunk, as some recorders write
    fmt_end = 12 + 8 + int.from_bytes(data[16:20], "little")
    extra = b"LIST" + (4).to_bytes(4, "little") + b"INFO"
    patched = data[:fmt_end] + extra + data[fmt_end:]
    patched = patched[:4] + (len(patched) - 8).to_bytes(4, "little") + patched[8:]
    mono, sr = audio.decode(patched)
    assert sr == 16000 and np.allclose(mono, audio.decode(data)[0])
    assert audio._plain_wav(wav_bytes(x, fmt="FLAC")) is None
    assert audio._plain_wav(wav_bytes(x, subtype="ULAW")) is None  # not PCM: libsndfile decodes it
    assert len(audio.decode(wav_bytes(x, subtype="ULAW"))[0]) == 1600
