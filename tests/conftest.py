"""Shared fixtures: small random-weight models in the released layout, and audio."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from a2e.checkpoint import save_checkpoint
from a2e.model import DEFAULT_WAV2VEC2_CONFIG, Audio2Expression, ModelDims

DATA = Path(__file__).parent / "data"
ENGLISH = DATA / "BarackObama_english.wav"  # 16 kHz stereo WAV, 8.0 s
MP3_AS_WAV = DATA / "LinJing_TTS_chinese.wav"  # really an MP3 at 48 kHz

torch.set_num_threads(2)
# Servers the tests start keep off the Audio2Face-3D port (52000) unless a
# test gives one: a developer's own server may be holding it.
os.environ.setdefault("A2E_GRPC_PORT", "0")


def tiny_wav2vec2() -> dict:
    """wav2vec2-base-960h with narrow layers: same strides (50 fps), same key names."""
    cfg = json.loads(DEFAULT_WAV2VEC2_CONFIG.read_text())
    cfg.update(
        conv_dim=[32] * 7,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    )
    return cfg


def tiny_dims(**overrides) -> ModelDims:
    base = dict(wav2vec2=tiny_wav2vec2(), hidden_dim=32, identity_feat_dim=8)
    base.update(overrides)
    return ModelDims(**base)


def make_model(dims: ModelDims, seed: int = 0) -> Audio2Expression:
    torch.manual_seed(seed)
    model = Audio2Expression(dims).eval()
    # Default init leaves outputs near 0.5 everywhere; spread the output layer
    # so post-processing and comparisons see real variation.
    with torch.no_grad():
        model.output_proj.weight.mul_(8.0)
    return model


@pytest.fixture(scope="session")
def dims() -> ModelDims:
    return tiny_dims()


@pytest.fixture(scope="session")
def model(dims) -> Audio2Expression:
    return make_model(dims)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, model) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny_streaming.tar"
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="session")
def config_file(tmp_path_factory, dims) -> Path:
    """An upstream-style config naming the tiny model's wav2vec2 config."""
    d = tmp_path_factory.mktemp("cfg")
    (d / "w2v.json").write_text(json.dumps(dims.wav2vec2))
    path = d / "tiny_config.py"
    path.write_text(
        "weight = 'missing.tar'\n"
        "model = dict(type='DefaultEstimator', backbone=dict(type='Audio2Expression',\n"
        f"    wav2vec2_config_path={str(d / 'w2v.json')!r}, num_identity_classes=12,\n"
        f"    identity_feat_dim={dims.identity_feat_dim}, hidden_dim={dims.hidden_dim},\n"
        "    expression_dim=52, norm_type='ln', use_transformer=False))\n"
    )
    return path


def speech_like(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """Deterministic voiced bursts separated by true silence."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    envelope = (np.sin(2 * np.pi * 1.3 * t) > 0).astype(np.float32)
    tone = 0.3 * np.sin(2 * np.pi * 180 * t) + 0.05 * rng.standard_normal(len(t))
    return (tone * envelope).astype(np.float32)


def wav_bytes(audio: np.ndarray, sr: int = 16000, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.fixture(scope="session")
def english_16k() -> np.ndarray:
    from a2e.audio import load

    return load(ENGLISH.read_bytes())
