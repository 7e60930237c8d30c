"""The LAM-A2E network: a wav2vec 2.0 encoder run at 30 fps, an identity encoder
and a convolutional decoder.

Module and parameter names follow the released checkpoint's layout exactly
(below its ``backbone.`` prefix) so that its state dict loads strictly.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Wav2Vec2Config
from transformers.models.wav2vec2.modeling_wav2vec2 import (
    Wav2Vec2Encoder,
    Wav2Vec2FeatureEncoder,
    Wav2Vec2FeatureProjection,
)

from .constants import FPS, NUM_BLENDSHAPES, SAMPLE_RATE

DEFAULT_WAV2VEC2_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "wav2vec2_config.json"


@dataclass(frozen=True)
class ModelDims:
    """Everything that fixes the network's shapes.

    ``wav2vec2`` holds the Wav2Vec2Config fields (the released model uses
    wav2vec2-base-960h); small values make fast test models of the same layout.
    """

    wav2vec2: dict[str, Any] = field(default_factory=dict)
    num_identity_classes: int = 12
    identity_feat_dim: int = 64
    hidden_dim: int = 512
    expression_dim: int = NUM_BLENDSHAPES
    decoder_depth: int = 3
    use_transformer: bool = False
    num_attention_heads: int = 8
    num_transformer_layers: int = 6
    # The upstream encoder declares an unused CTC head with this input width.
    lm_head_in_features: int = 1024

    @classmethod
    def released(cls, **overrides: Any) -> "ModelDims":
        """The released streaming model's dimensions (wav2vec2-base-960h encoder)."""
        cfg = json.loads(DEFAULT_WAV2VEC2_CONFIG.read_text())
        return cls(wav2vec2=cfg, **overrides)

    def wav2vec2_config(self) -> Wav2Vec2Config:
        cfg = Wav2Vec2Config(**self.wav2vec2)
        # sdpa computes the same attention as the eager kernel the checkpoint
        # was trained with, to float rounding, and is faster on CPU and GPU.
        cfg._attn_implementation = "sdpa"
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AudioEncoder(nn.Module):
    """wav2vec 2.0 whose feature frames are resampled to ``T`` (30 fps) before the transformer."""

    def __init__(self, config: Wav2Vec2Config, lm_head_in_features: int) -> None:
        super().__init__()
        self.config = config
        self.feature_extractor = Wav2Vec2FeatureEncoder(config)
        self.feature_projection = Wav2Vec2FeatureProjection(config)
        self.encoder = Wav2Vec2Encoder(config)
        # Never used in inference; present in every checkpoint.
        self.masked_spec_embed = nn.Parameter(torch.zeros(config.hidden_size))
        self.lm_head = nn.Linear(lm_head_in_features, config.vocab_size)

    def forward(self, audio: torch.Tensor, num_frames: int) -> torch.Tensor:
        features = self.feature_extractor(audio)  # [B, C, L] at ~50 fps
        features = F.interpolate(features, size=num_frames, mode="linear", align_corners=True)
        hidden, _ = self.feature_projection(features.transpose(1, 2))
        return self.encoder(hidden).last_hidden_state  # [B, T, hidden]


class ConvNormRelu(nn.Module):
    """Conv1d(k=3) -> LayerNorm over channels -> (+ residual) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, residual: bool = False) -> None:
        super().__init__()
        self.residual = residual
        if residual:
            # A plain Sequential, so the checkpoint key is ``residual_layer.0``.
            self.residual_layer: nn.Module = (
                nn.Identity()
                if in_channels == out_channels
                else nn.Sequential(nn.Conv1d(in_channels, out_channels, 3, 1, 1))
            )
        self.conv = nn.Conv1d(in_channels, out_channels, 3, 1, 1)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.conv(x).transpose(1, 2)).transpose(1, 2)
        if self.residual:
            out = out + self.residual_layer(x)
        return F.relu(out)


class ConvStack(nn.Module):
    """Three residual ConvNormRelu blocks (the checkpoint calls it ``first_net``)."""

    def __init__(self, in_channels: int, out_channels: int, depth: int = 3) -> None:
        super().__init__()
        blocks = [ConvNormRelu(in_channels, out_channels, residual=True)]
        blocks += [ConvNormRelu(out_channels, out_channels, residual=True) for _ in range(depth - 1)]
        self.conv_layers = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_layers(x)


class IdentityEncoder(nn.Module):
    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        self.id_mlp = nn.Conv1d(dims.num_identity_classes, dims.identity_feat_dim, 1, 1)
        self.first_net = ConvStack(dims.hidden_dim + dims.identity_feat_dim, dims.hidden_dim)
        # Declared but never called by the released model; kept for its weights.
        self.grus = nn.GRU(dims.hidden_dim, dims.hidden_dim, 1, batch_first=True)
        self.use_transformer = dims.use_transformer
        if dims.use_transformer:
            layer = nn.TransformerEncoderLayer(
                d_model=dims.hidden_dim,
                nhead=dims.num_attention_heads,
                dim_feedforward=2 * dims.hidden_dim,
                batch_first=True,
            )
            self.transformer_encoder = nn.TransformerEncoder(layer, num_layers=dims.num_transformer_layers)

    def forward(self, features: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        steps = features.shape[2]
        ident = self.id_mlp(identity.to(features.dtype).unsqueeze(2).expand(-1, -1, steps))
        x = self.first_net(torch.cat([features, ident], dim=1))
        if self.use_transformer:
            x = self.transformer_encoder(x.transpose(1, 2)).transpose(1, 2)
        return x


class Audio2Expression(nn.Module):
    """Audio ``[B, N]`` at 16 kHz plus one-hot identity ``[B, C]`` -> weights ``[B, T, 52]``."""

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        self.dims = dims
        config = dims.wav2vec2_config()
        self.audio_encoder = AudioEncoder(config, dims.lm_head_in_features)
        self.feature_projection = nn.Linear(config.hidden_size, dims.hidden_dim)
        self.identity_encoder = IdentityEncoder(dims)
        self.decoder = nn.ModuleList(
            [nn.Sequential(*[ConvNormRelu(dims.hidden_dim, dims.hidden_dim) for _ in range(dims.decoder_depth)])]
        )
        self.output_proj = nn.Linear(dims.hidden_dim, dims.expression_dim)

    def forward(self, audio: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        num_frames = math.ceil(audio.shape[1] / SAMPLE_RATE * FPS)
        hidden = self.audio_encoder(audio, num_frames)
        x = self.feature_projection(hidden).transpose(1, 2)
        x = self.identity_encoder(x, identity)
        x = self.decoder[0](x).transpose(1, 2)
        return torch.sigmoid(self.output_proj(x))


def fold_weight_norm(model: nn.Module) -> None:
    """Replace weight-norm parametrisations by plain weights (same outputs, no
    per-call recomputation; required before CUDA graph capture)."""
    from torch.nn.utils import parametrize

    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
