"""a2e-lite: the project's own small audio-to-expression model.

Same contract as LAM-A2E (``forward(audio [B, N] at 16 kHz, one-hot identity
[B, 12]) -> [B, ceil(N/16000*30), 52]`` in 0..1), so streaming, whole clips,
post-processing and the batcher treat both alike. Log-mel front-end (25 ms
windows every 10 ms, 64 bands), a strided conv stack at 100 -> 50 fps,
linear resampling to 30 fps (as LAM does before its transformer), then
dilated residual convs with the identity as a per-channel scale and shift.
About 0.2 M parameters, under 2 ms of CPU per window; weights ship as safetensors
(``pretrained_models/a2e-lite.safetensors``, model card beside it).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .constants import FPS, NUM_BLENDSHAPES, SAMPLE_RATE
from .errors import CheckpointError

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "pretrained_models" / "a2e-lite.safetensors"


@dataclass(frozen=True)
class LiteDims:
    num_identity_classes: int = 12
    n_mels: int = 64
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    channels: int = 96
    blocks: int = 4
    kernel: int = 3
    expression_dim: int = NUM_BLENDSHAPES


def mel_filterbank(n_fft: int, n_mels: int, sr: int = SAMPLE_RATE, fmin: float = 40.0, fmax: float = 7600.0) -> np.ndarray:
    """Triangular mel filters ``[n_mels, n_fft // 2 + 1]`` (HTK mel scale)."""
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    points = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    bank = np.zeros((n_mels, len(freqs)), dtype=np.float32)
    for i in range(n_mels):
        lo, mid, hi = points[i], points[i + 1], points[i + 2]
        rise = (freqs - lo) / (mid - lo)
        fall = (hi - freqs) / (hi - mid)
        bank[i] = np.maximum(0, np.minimum(rise, fall))
    return bank


class LogMel(nn.Module):
    def __init__(self, dims: LiteDims) -> None:
        super().__init__()
        self.dims = dims
        self.register_buffer("window", torch.hann_window(dims.win_length), persistent=False)
        self.register_buffer("bank", torch.from_numpy(mel_filterbank(dims.n_fft, dims.n_mels)), persistent=False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        d = self.dims
        spec = torch.stft(
            audio.float(), d.n_fft, d.hop_length, d.win_length, self.window, center=True, return_complex=True
        )
        power = spec.real.square() + spec.imag.square()  # |X|^2 without a square root (4x cheaper than abs)
        return torch.log(torch.matmul(self.bank, power) + 1e-6)  # [B, n_mels, frames]


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, kernel: int, dilation: int, num_ids: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel, padding=dilation * (kernel // 2), dilation=dilation)
        self.norm = nn.GroupNorm(1, channels)
        self.film = nn.Linear(num_ids, 2 * channels)

    def forward(self, x: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(identity).unsqueeze(2).chunk(2, dim=1)
        return x + F.gelu(self.norm(self.conv(x)) * (1 + scale) + shift)


class A2ELite(nn.Module):
    def __init__(self, dims: LiteDims = LiteDims()) -> None:
        super().__init__()
        self.dims = dims
        c = dims.channels
        self.mel = LogMel(dims)
        self.input_norm = nn.InstanceNorm1d(dims.n_mels, affine=True)
        self.front = nn.Sequential(
            nn.Conv1d(dims.n_mels, c, 3, padding=1),
            nn.GELU(),
            nn.Conv1d(c, c, 5, stride=2, padding=2),  # 100 -> 50 fps
            nn.GELU(),
        )
        self.blocks = nn.ModuleList(
            [ResidualBlock(c, dims.kernel, 2**i, dims.num_identity_classes) for i in range(dims.blocks)]
        )
        self.head = nn.Conv1d(c, dims.expression_dim, 1)

    def forward(self, audio: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        num_frames = math.ceil(audio.shape[1] / SAMPLE_RATE * FPS)
        x = self.front(self.input_norm(self.mel(audio)))
        x = F.interpolate(x, size=num_frames, mode="linear", align_corners=True)
        identity = identity.to(x.dtype)
        for block in self.blocks:
            x = block(x, identity)
        return torch.sigmoid(self.head(x)).transpose(1, 2)


def save_lite(model: A2ELite, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    meta = {"dims": json.dumps(asdict(model.dims)), **(metadata or {})}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)


def load_lite(path: str | Path = DEFAULT_WEIGHTS, device: str = "cpu") -> A2ELite:
    """Load shipped a2e-lite weights (safetensors with its dims in the metadata), strictly."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"a2e-lite weights not found at {path}")
    try:
        with safe_open(str(path), "pt") as f:
            dims = LiteDims(**json.loads((f.metadata() or {})["dims"]))
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (KeyError, ValueError, OSError, TypeError) as exc:
        raise CheckpointError(f"{path} is not an a2e-lite checkpoint: {exc}") from None
    model = A2ELite(dims)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit a2e-lite: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.to(device).eval()
