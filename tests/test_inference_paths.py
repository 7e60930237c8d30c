"""Whole-clip and streaming paths against the spec (sections 3 and 4), on a small model."""

import math
import tracemalloc

import numpy as np
import pytest

from a2e import clip, postprocess, streaming
from a2e.audio import rms_volume
from a2e.backend import TorchBackend
from a2e.constants import WINDOW_SAMPLES
from tests.conftest import speech_like

BLINKS = [8, 9]
OTHER = [c for c in range(52) if c not in BLINKS]


class SpyBackend(TorchBackend):
    """Records the shapes that reach the model."""

    def __init__(self, model):
        super().__init__(model)
        self.window_batches: list[int] = []
        self.clip_lengths: list[int] = []

    def run_windows(self, windows, identities):
        self.window_batches.append(len(windows))
        return super().run_windows(windows, identities)

    def run_clip(self, audio, identity):
        self.clip_lengths.append(len(audio))
        return super().run_clip(audio, identity)


@pytest.fixture
def backend(model):
    return SpyBackend(model)


def reference_stream(backend, chunks, identity, seed):
    """The reference's streaming loop as the spec describes it: every window is
    zeros + chunk (its context flag is never cleared), post-processing context kept."""
    rng = np.random.default_rng(seed)
    prev = prev_vol = None
    outputs = []
    for chunk in chunks:
        vol = rms_volume(chunk, 16000, frame_length=min(533, len(chunk)))[: math.ceil(len(chunk) / 16000 * 30)]
        window = np.concatenate([np.zeros(WINDOW_SAMPLES - len(chunk), np.float32), chunk])
        raw = backend.run_windows(window[None], np.array([identity]))[0]
        new = raw[int(64 - len(chunk) / 16000 * 30) :]
        out = postprocess.postprocess_chunk(prev, prev_vol, new, vol, rng)
        prev = out if prev is None else np.concatenate([prev, out])[-64:]
        prev_vol = vol if prev_vol is None else np.concatenate([prev_vol, vol])[-64:]
        outputs.append(out)
    return outputs


def chunks_of(audio, size=16000):
    return [audio[i : i + size] for i in range(0, len(audio), size)]


def test_reference_mode_reproduces_the_reference_loop(backend, english_16k):
    chunks = chunks_of(english_16k)
    want = reference_stream(backend, chunks, identity=4, seed=9)
    state = streaming.StreamState(identity=4, rng=np.random.default_rng(9), mode=streaming.ContextMode.REFERENCE)
    got = [streaming.push_chunk(state, backend, c) for c in chunks]
    assert [len(g) for g in got] == [30] * 7 + [30]
    for g, w in zip(got, want):
        assert np.allclose(g[:, OTHER], w[:, OTHER], atol=1e-6)


def test_continuous_mode_windows_hold_the_real_audio_context(backend):
    audio = speech_like(5.0)
    sizes = [16000, 8000, 24000, 16000, 16000]
    state = streaming.StreamState(identity=0, rng=np.random.default_rng(0))
    padded = np.concatenate([np.zeros(WINDOW_SAMPLES, np.float32), audio])
    pos = 0
    for size in sizes:
        plans = streaming.plan_chunk(state, audio[pos : pos + size])
        pos += size
        assert len(plans) == 1
        end = WINDOW_SAMPLES + pos
        assert np.array_equal(plans[0].window, padded[end - WINDOW_SAMPLES : end])
        assert plans[0].num_frames == math.ceil(size / 16000 * 30)


def test_modes_agree_on_the_first_chunk_only(backend, english_16k):
    chunks = chunks_of(english_16k)[:3]
    out = {}
    for mode in streaming.ContextMode:
        state = streaming.StreamState(identity=0, rng=np.random.default_rng(1), mode=mode)
        out[mode] = [streaming.push_chunk(state, backend, c) for c in chunks]
    cont, ref = out[streaming.ContextMode.CONTINUOUS], out[streaming.ContextMode.REFERENCE]
    assert np.allclose(cont[0], ref[0])
    assert np.abs(cont[1][:, OTHER] - ref[1][:, OTHER]).max() > 1e-3


@pytest.mark.parametrize("seconds,frames", [(0.1, 3), (0.5, 15), (1.0, 30), (1.5, 45), (2.2, 66), (5.0, 150)])
def test_chunk_frame_counts(backend, seconds, frames):
    state = streaming.StreamState(identity=0, rng=np.random.default_rng(0))
    out = streaming.push_chunk(state, backend, speech_like(seconds))
    assert out.shape == (frames, 52)
    assert out.min() >= 0 and out.max() <= 1


def test_long_chunk_equals_its_sub_chunks_sent_one_by_one(backend):
    audio = speech_like(5.0, seed=3)
    a = streaming.StreamState(identity=2, rng=np.random.default_rng(5))
    whole = streaming.push_chunk(a, backend, audio)
    assert backend.window_batches[-1] == 3  # 2 s + 2 s + 1 s, one batch
    b = streaming.StreamState(identity=2, rng=np.random.default_rng(5))
    parts = np.concatenate([streaming.push_chunk(b, backend, p) for p in chunks_of(audio, 32000)])
    assert np.allclose(whole, parts, atol=1e-6)


def test_single_frame_stream_state_and_context_limits(backend):
    state = streaming.StreamState(identity=0, rng=np.random.default_rng(0))
    for _ in range(5):
        streaming.push_chunk(state, backend, speech_like(1.0))
    assert state.previous_frames.shape == (64, 52)
    assert state.previous_volume.shape == (64,)
    assert state.previous_audio.shape == (WINDOW_SAMPLES,)
    assert state.frames_sent == 150


def test_whole_clip_is_one_pass_with_the_spec_pipeline(backend, model, english_16k):
    out = clip.infer_clip(backend, english_16k, 3, np.random.default_rng(0), movement_smooth=True, brow_movement=True)
    assert backend.clip_lengths == [len(english_16k)]
    assert out.shape == (math.ceil(len(english_16k) / 16000 * 30), 52)
    raw = TorchBackend(model).run_clip(english_16k, 3)
    vol = rms_volume(english_16k)
    want = postprocess.postprocess_clip(raw, vol, np.random.default_rng(0), movement_smooth=True, brow=True)
    assert np.allclose(out, want, atol=1e-6)


def test_window_starts_cover_the_clip():
    assert clip.window_starts(WINDOW_SAMPLES) == [0]
    starts = clip.window_starts(16000 * 10)
    assert starts[0] == 0 and all(b - a == 16000 for a, b in zip(starts, starts[1:]))
    assert starts[-1] + WINDOW_SAMPLES >= 160000 > starts[-1] + WINDOW_SAMPLES - 16000


def test_windowed_clip_frames_come_from_their_windows(backend):
    audio = speech_like(3.0)  # windows at 0 s and 1 s
    raw = clip.run_windowed(backend, audio, 0)
    assert raw.shape == (90, 52)
    first = backend.run_windows(audio[None, :WINDOW_SAMPLES], np.array([0]))[0]
    # frames 0..29 lie in the first window only
    assert np.allclose(raw[:30], first[:30], atol=1e-6)


def test_ten_minute_clip_runs_in_bounded_memory(backend):
    seconds = 600
    audio = speech_like(seconds, seed=7)
    tracemalloc.start()
    out = clip.infer_clip(backend, audio, 0, np.random.default_rng(0), max_single_pass_seconds=30)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert out.shape == (seconds * 30, 52)
    assert backend.clip_lengths == []  # never one pass over 10 minutes
    assert max(backend.window_batches) <= 8
    # audio (38 MB) is the caller's; the result and its float64 scratch are ~15 MB.
    # A single pass would need gigabytes; the windowed path stays near its output size.
    assert peak < 60e6, peak
    assert np.isfinite(out).all()
