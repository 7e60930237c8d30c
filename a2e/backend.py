"""The two ways inference reaches the model, and their plain eager implementation.

* ``run_windows``: a batch of fixed-shape streaming windows ``[B, 34133]`` with
  one identity each -> ``[B, 64, 52]``. Every streaming chunk and every window
  of a long clip goes through here, which is what makes batching across
  sessions (and CUDA graphs of fixed shape) possible.
* ``run_clip``: one variable-length sequence ``[N]`` -> ``[ceil(N/16000*30), 52]``.
  Clips are never padded along time to share a batch: the first conv layer's
  group norm normalises over time, so padding would change the output.

The batcher (``batching/``) implements the same protocol on top of a backend.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .constants import WINDOW_FRAMES, WINDOW_SAMPLES
from .model import Audio2Expression
from .precision import keep_float32_where_inexact


class Backend(Protocol):
    num_identities: int

    def run_windows(self, windows: np.ndarray, identities: np.ndarray) -> np.ndarray: ...

    def run_clip(self, audio: np.ndarray, identity: int) -> np.ndarray: ...


class TorchBackend:
    """Eager PyTorch execution of a loaded model on one device."""

    def __init__(self, model: Audio2Expression, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(self.device, dtype=dtype).eval()
        self.float32_layers = keep_float32_where_inexact(self.model, dtype)
        self.num_identities = model.dims.num_identity_classes
        self._forward = self.model  # the batch path; a runner may compile it

    def one_hot(self, identities: np.ndarray | list[int]) -> torch.Tensor:
        ids = torch.as_tensor(np.asarray(identities, dtype=np.int64), device=self.device)
        return F.one_hot(ids, self.num_identities).to(self.dtype)

    @torch.inference_mode()
    def run_windows(self, windows: np.ndarray, identities: np.ndarray) -> np.ndarray:
        windows = np.asarray(windows, dtype=np.float32)
        if windows.ndim != 2 or windows.shape[1] != WINDOW_SAMPLES:
            raise ValueError(f"windows must be [B, {WINDOW_SAMPLES}], got {windows.shape}")
        x = torch.from_numpy(windows).to(self.device, self.dtype)
        out = self._forward(x, self.one_hot(identities))
        assert out.shape[1] == WINDOW_FRAMES
        return out.float().cpu().numpy()

    @torch.inference_mode()
    def run_clip(self, audio: np.ndarray, identity: int) -> np.ndarray:
        x = torch.from_numpy(np.asarray(audio, dtype=np.float32)[None]).to(self.device, self.dtype)
        return self.model(x, self.one_hot([identity]))[0].float().cpu().numpy()
