"""a2e-lite: the shipped weights, the LAM contract, and what the face does."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from a2e.backend import TorchBackend
from a2e.constants import WINDOW_SAMPLES, channel_index
from a2e.errors import CheckpointError
from a2e.lite import DEFAULT_WEIGHTS, A2ELite, LiteDims, load_lite, save_lite
from training.synth import parse_pho
from training.targets import LEAD_S, visemes_of
from tests.conftest import DATA

MOUTH = [channel_index(n) for n in ("jawOpen", "mouthClose", "mouthLowerDownLeft", "mouthPucker", "mouthFunnel", "mouthStretchLeft")]


@pytest.fixture(scope="module")
def lite():
    return TorchBackend(load_lite())


def test_shipped_weights_load_strictly(tmp_path):
    model = load_lite(DEFAULT_WEIGHTS)
    assert DEFAULT_WEIGHTS.stat().st_size < 5 * 1024 * 1024
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    assert model.dims.num_identity_classes == 12
    broken = tmp_path / "broken.safetensors"
    other = A2ELite(LiteDims(channels=32))
    save_lite(other, broken)
    state_only = tmp_path / "nodims.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(state_only))
    with pytest.raises(CheckpointError, match="not an a2e-lite checkpoint"):
        load_lite(state_only)
    assert load_lite(broken).dims.channels == 32  # dims travel with the weights
    with pytest.raises(CheckpointError, match="not found"):
        load_lite(tmp_path / "absent.safetensors")


def test_lam_contract(lite):
    rng = np.random.default_rng(0)
    windows = (rng.standard_normal((3, WINDOW_SAMPLES)) * 0.1).astype(np.float32)
    out = lite.run_windows(windows, np.array([0, 5, 11]))
    assert out.shape == (3, 64, 52) and out.dtype == np.float32
    assert 0 <= out.min() and out.max() <= 1
    clip = lite.run_clip(rng.standard_normal(16000 * 3 + 7).astype(np.float32) * 0.1, 4)
    assert clip.shape == (91, 52)


def test_identities_are_distinct_styles(lite):
    audio, _ = sf.read(DATA / "BarackObama_english.wav", dtype="float32")
    x = audio.mean(1)[: WINDOW_SAMPLES]
    out = lite.run_windows(np.repeat(x[None], 12, 0), np.arange(12))
    smile = channel_index("mouthSmileLeft")
    assert out[5, :, smile].mean() > out[0, :, smile].mean() + 0.05  # 5: smiling
    jaw = channel_index("jawOpen")
    assert out[3, :, jaw].mean() > out[2, :, jaw].mean()  # 3 jaw-driven vs 2 soft


def test_silence_gives_a_neutral_mouth(lite):
    out = lite.run_windows(np.zeros((1, WINDOW_SAMPLES), np.float32), np.array([0]))
    assert out[0][:, MOUTH].max() < 0.08


def test_bilabials_close_the_lips_on_a_held_out_voice(lite):
    """'Mama, papa, bob': MBROLA us3, a voice kept out of training."""
    audio, sr = sf.read(DATA / "bilabials_us3.wav", dtype="float32")
    phonemes = parse_pho((DATA / "bilabials_us3.pho").read_text())
    out = lite.run_clip(audio, 0)
    close, jaw = channel_index("mouthClose"), channel_index("jawOpen")
    at = {"PP": [], "aa": []}
    for sym, a, b in phonemes:
        vis = visemes_of(sym)[0]
        if vis in at:
            f = int(round(((a + b) / 2 - LEAD_S) * 30))
            at[vis].append(out[max(0, min(f, len(out) - 1))])
    pp, aa = np.array(at["PP"]), np.array(at["aa"])
    assert pp[:, close].mean() > aa[:, close].mean() + 0.05
    assert aa[:, jaw].mean() > pp[:, jaw].mean() + 0.03


def test_lite_reaches_the_model_through_the_same_paths(lite):
    from a2e import streaming

    state = streaming.StreamState(identity=1, rng=np.random.default_rng(0))
    audio, _ = sf.read(DATA / "BarackObama_english.wav", dtype="float32")
    x = audio.mean(1)
    frames = [streaming.push_chunk(state, lite, x[i : i + 16000]) for i in range(0, 48000, 16000)]
    assert [len(f) for f in frames] == [30, 30, 30]
    moving = np.concatenate(frames)[:, channel_index("jawOpen")]
    assert moving.std() > 0.01  # it moves while speaking
    assert torch.is_tensor(F.one_hot(torch.tensor([1]), 12))
