"""Vocal isolation (ex_vol) with a small random-weight Demucs model in a local
model directory, and the loudness options."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time

import numpy as np
import pytest
import torch
from sanic_testing.testing import SanicASGITestClient

from a2e import clip, loudness, postprocess, streaming
from a2e.audio import rms_volume
from a2e.backend import TorchBackend
from a2e.separation import SeparationUnavailable, VocalSeparator
from app import create_app
from engine.service import InferenceService
from runtime.settings import Settings
from tests.conftest import ENGLISH, speech_like, wav_bytes


@pytest.fixture(scope="module")
def demucs_dir(tmp_path_factory):
    """A local Demucs model directory holding a tiny random-weight HTDemucs."""
    from demucs.htdemucs import HTDemucs
    from demucs.states import get_state

    torch.manual_seed(0)
    model = HTDemucs(sources=["drums", "bass", "other", "vocals"], channels=8, depth=4, t_layers=1, t_heads=2, segment=4)
    args, kwargs = model._init_args_kwargs
    d = tmp_path_factory.mktemp("demucs_models")
    torch.save({"klass": HTDemucs, "args": args, "kwargs": kwargs, "state": get_state(model, None, half=False)}, d / "tinydemucs.th")
    return d


def mixture(seconds=3.0, sr=44100):
    """Speech-like bursts over a steady 'music' chord, stereo."""
    t = np.arange(int(seconds * sr)) / sr
    voice = speech_like(seconds, sr)
    music = 0.2 * (np.sin(2 * np.pi * 220 * t) + np.sin(2 * np.pi * 330 * t) + np.sin(2 * np.pi * 55 * t))
    left, right = voice + music, voice + 0.8 * music
    return np.stack([left, right], 1).astype(np.float32)


# -- the separator -------------------------------------------------------------------


def test_separator_returns_a_vocal_stem(demucs_dir):
    sep = VocalSeparator("tinydemucs", demucs_dir)
    assert sep.status["available"] is None  # not loaded until first use
    mix = mixture().T
    voice = sep.vocals(mix, 44100)
    assert voice.ndim == 1 and abs(len(voice) - mix.shape[1]) <= 2
    assert np.isfinite(voice).all()
    assert not np.allclose(voice, mix.mean(0), atol=1e-3)
    assert sep.status["available"] is True


def test_separator_unavailable_is_explained_and_remembered(tmp_path):
    sep = VocalSeparator("htdemucs", tmp_path)  # an empty directory
    with pytest.raises(SeparationUnavailable, match="could not be loaded in"):
        sep.vocals(np.zeros(44100, np.float32), 44100)
    assert sep.status["available"] is False and "htdemucs" in sep.status["detail"]
    t0 = time.perf_counter()
    with pytest.raises(SeparationUnavailable):
        sep.load()
    assert time.perf_counter() - t0 < 0.05  # remembered, not retried
    missing = VocalSeparator("htdemucs", tmp_path / "nope")
    with pytest.raises(SeparationUnavailable, match="does not exist"):
        missing.load()


# -- ex_vol through the HTTP API -----------------------------------------------------------


def _app(checkpoint, config_file, **overrides):
    settings = Settings(config_file=str(config_file), weight=str(checkpoint), **overrides).validate()
    service = InferenceService(settings)
    service.load()
    return SanicASGITestClient(create_app(settings, service)), service


async def test_ex_vol_unavailable_says_why_without_the_servers_paths(checkpoint, config_file, tmp_path, caplog):
    hidden = tmp_path / "srv-private-layout" / "empty_demucs"
    client, service = _app(checkpoint, config_file, separation_model_dir=str(hidden))
    try:
        with caplog.at_level("WARNING", logger="a2e.separation"):
            _, res = await client.post("/api/infer", files={"audio_file": ("a.wav", wav_bytes(mixture(), 44100))},
                                       data={"ex_vol": "true"})  # fmt: skip
        assert res.status == 503 and "does not exist" in res.json["detail"]
        assert "--separation-model-dir" in res.json["detail"]
        assert "srv-private-layout" not in res.text and str(tmp_path) not in res.text
        assert str(hidden) in caplog.text  # the operator's log has it
        _, res = await client.get("/api/health")
        assert "srv-private-layout" not in res.text
    finally:
        service.close()


async def test_ex_vol_end_to_end(checkpoint, config_file, demucs_dir, monkeypatch):
    client, service = _app(checkpoint, config_file, separation_model="tinydemucs", separation_model_dir=str(demucs_dir))

    def no_shell(*args, **kwargs):
        raise AssertionError("nothing may reach a shell")

    monkeypatch.setattr(subprocess, "Popen", no_shell)
    monkeypatch.setattr(os, "system", no_shell)
    before = set(os.listdir(tempfile.gettempdir()))
    try:
        data = wav_bytes(mixture(), 44100)
        name = "evil; rm -rf ~ $(touch pwned).wav"
        bodies = {}
        for ex_vol in ("false", "true"):
            _, res = await client.post(
                "/api/infer", files={"audio_file": (name, data)}, data={"ex_vol": ex_vol, "seed": "1"}
            )
            assert res.status == 200, res.text
            bodies[ex_vol] = np.array([f["weights"] for f in res.json["frames"]])
        assert bodies["true"].shape == bodies["false"].shape == (90, 52)
        assert np.abs(bodies["true"] - bodies["false"]).max() > 1e-3
        _, res = await client.get("/api/health")
        assert res.json["vocal_isolation"]["available"] is True
    finally:
        service.close()
    created = set(os.listdir(tempfile.gettempdir())) - before
    assert not [f for f in created if "evil" in f or "pwned" in f]
    assert not os.path.exists("pwned")


async def test_ex_vol_without_a_model_is_a_clear_503(checkpoint, config_file, tmp_path):
    client, service = _app(checkpoint, config_file, separation_model_dir=str(tmp_path))
    try:
        _, res = await client.post("/api/infer", files={"audio_file": ("a.wav", wav_bytes(speech_like(1)))}, data={"ex_vol": "1"})
        assert res.status == 503
        assert "vocal isolation" in res.json["detail"] and "--separation-model-dir" in res.json["detail"]
        assert res.headers["retry-after"]
        _, res = await client.get("/api/health")
        assert res.json["status"] == "healthy" and res.json["vocal_isolation"]["available"] is False
        _, res = await client.post("/api/infer", files={"audio_file": ("a.wav", wav_bytes(speech_like(1)))})
        assert res.status == 200
    finally:
        service.close()


async def test_ex_vol_length_limit(checkpoint, config_file, demucs_dir):
    client, service = _app(
        checkpoint, config_file, separation_model="tinydemucs", separation_model_dir=str(demucs_dir), separation_max_s=2
    )
    try:
        _, res = await client.post(
            "/api/infer", files={"audio_file": ("a.wav", wav_bytes(speech_like(3)))}, data={"ex_vol": "true"}
        )
        assert res.status == 413 and "limit is 2 s" in res.json["detail"]
    finally:
        service.close()


# -- loudness -------------------------------------------------------------------------------


def test_integrated_loudness_guards_and_scales(english_16k):
    assert loudness.integrated_loudness(english_16k[:6000]) is None  # shorter than 0.4 s
    assert loudness.integrated_loudness(np.zeros(16000, np.float32)) is None  # silence
    normal = loudness.integrated_loudness(english_16k)
    quiet = loudness.integrated_loudness(english_16k * 0.1)
    assert -30 < normal < -10
    assert quiet == pytest.approx(normal - 20, abs=0.05)
    assert loudness.gain_db_for(-80.0) == loudness.MAX_GAIN_DB
    assert loudness.gain_db_for(None) == 0.0


def _silent_runs(audio, mode):
    gain = loudness.clip_gain(audio)
    vol = rms_volume(audio) * (gain if mode is loudness.LoudnessMode.GATES else 1.0)
    return [r.tolist() for r in postprocess.find_silent_runs(vol)]


def test_quiet_and_loud_copies_damp_the_same_regions_with_gates(english_16k):
    quiet, loud = english_16k * 0.05, english_16k * 1.3
    assert np.abs(loud).max() < 1.0  # no clipping: the same speech at two levels
    off_q, off_l = _silent_runs(quiet, loudness.LoudnessMode.OFF), _silent_runs(loud, loudness.LoudnessMode.OFF)
    # off: exactly the reference's detection on the audio as it is, level-dependent
    assert off_q == [r.tolist() for r in postprocess.find_silent_runs(rms_volume(quiet))]
    assert off_q != off_l
    on_q, on_l = _silent_runs(quiet, loudness.LoudnessMode.GATES), _silent_runs(loud, loudness.LoudnessMode.GATES)
    assert on_q == on_l


def test_clip_modes(model, english_16k):
    backend = TorchBackend(model)
    quiet, loud = english_16k * 0.05, english_16k * 1.3
    run = lambda a, mode: clip.infer_clip(  # noqa: E731
        backend, a, 0, np.random.default_rng(0), movement_smooth=True, loudness=mode
    )
    off = {k: run(a, loudness.LoudnessMode.OFF) for k, a in (("q", quiet), ("l", loud))}
    norm = {k: run(a, loudness.LoudnessMode.NORMALIZE) for k, a in (("q", quiet), ("l", loud))}
    other = [c for c in range(52) if c not in (8, 9)]
    diff_off = np.abs(off["q"][:, other] - off["l"][:, other]).max()
    diff_norm = np.abs(norm["q"][:, other] - norm["l"][:, other]).max()
    assert diff_norm < 1e-3 < diff_off  # normalised input: the level no longer matters
    # off is exactly the reference pipeline
    raw = backend.run_clip(quiet, 0)
    want = postprocess.postprocess_clip(raw, rms_volume(quiet), np.random.default_rng(0), movement_smooth=True)
    assert np.allclose(off["q"], want, atol=1e-6)


def test_stream_loudness_is_per_session_and_stable(english_16k):
    gains = {}
    for name, scale in (("quiet", 0.05), ("loud", 1.3)):
        est = loudness.StreamLoudness()
        g = [est.update(english_16k[i : i + 16000] * scale) for i in range(0, 16000 * 7, 16000)]
        db = 20 * np.log10(g)
        assert np.all(np.abs(np.diff(db[1:])) < 3.0)  # no jumps from chunk to chunk
        gains[name] = db
    # the two sessions converge on the same level, 28 dB apart in gain
    assert (gains["quiet"][-1] - gains["loud"][-1]) == pytest.approx(20 * np.log10(1.3 / 0.05), abs=3.0)


async def test_reference_sessions_are_never_level_adjusted(checkpoint, config_file):
    settings = Settings(config_file=str(config_file), weight=str(checkpoint), loudness="gates").validate()
    service = InferenceService(settings)
    service.load()
    try:
        opened = await service.open_session(0, 1, "reference", loudness.LoudnessMode.GATES)
        assert opened.loudness == "off"
        ref = service.sessions.get(opened.session_id)
        cont = service.sessions.get((await service.open_session(0, 1, "continuous", loudness.LoudnessMode.GATES)).session_id)
        assert ref.state.loudness_mode is loudness.LoudnessMode.OFF and ref.state.loudness is None
        assert cont.state.loudness_mode is loudness.LoudnessMode.GATES
        plans = streaming.plan_chunk(cont.state, speech_like(1.0) * 0.01)
        assert cont.state.loudness.gain_db is not None and cont.state.loudness.gain_db > 10
        assert plans[0].volume.max() > np.abs(speech_like(1.0) * 0.01).max() * 0.5  # volume scaled up
    finally:
        service.close()


async def test_loudness_fields_in_the_api(checkpoint, config_file):
    client, service = _app(checkpoint, config_file)
    try:
        _, res = await client.post("/api/infer_stream_init", json={"context_mode": "reference", "loudness": "gates"})
        assert res.status == 422 and "loudness must be off" in res.json["detail"]
        _, res = await client.post("/api/infer_stream_init", json={"loudness": "normalize"})
        assert res.status == 200 and res.json["loudness"] == "normalize"
        _, res = await client.post("/api/infer_stream_init", json={"loudness": "louder"})
        assert res.status == 422
        _, res = await client.post(
            "/api/infer", files={"audio_file": ("a.wav", ENGLISH.read_bytes())}, data={"loudness": "gates"}
        )
        assert res.status == 200 and res.json["metadata"]["loudness"] == "gates"
    finally:
        service.close()
