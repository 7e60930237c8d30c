"""Vocal isolation (``ex_vol``) with Demucs, in-process: no shell, no files.

The separator loads its model on first use (or at start-up when the operator
asks), by name (default ``htdemucs``) from a local model directory when one
is configured, else the way Demucs resolves names (downloaded and cached on
first use when the machine is online). When the library or the weights are
not there, ``vocals()`` raises ``SeparationUnavailable`` with what to install
or configure; the failure is remembered for a while so a server without
weights answers at once instead of retrying a download on every request.

Demucs unpickles its model files (they hold the model class), so a local
model directory must be one the operator trusts, like any code it installs.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from .audio import resample
from .errors import A2EError

log = logging.getLogger("a2e.separation")

RETRY_AFTER_FAILURE_S = 300.0


class SeparationUnavailable(A2EError):
    """Vocal isolation cannot run here (library or weights missing). Its
    message is for clients (no paths of the server); ``log_detail`` is for
    the server's log and may name them."""

    def __init__(self, reason: str, log_detail: str | None = None) -> None:
        super().__init__(reason)
        self.log_detail = log_detail or reason


class VocalSeparator:
    def __init__(self, model_name: str = "htdemucs", model_dir: str | Path | None = None, device: str = "cpu") -> None:
        self.model_name = model_name
        self.model_dir = Path(model_dir) if model_dir else None
        self.device = device
        self._model = None
        self._failure: tuple[SeparationUnavailable, float] | None = None
        self._lock = threading.Lock()

    @property
    def status(self) -> dict:
        """For /api/health: available is None until the model was first loaded."""
        available = True if self._model is not None else (False if self._failure else None)
        return {
            "available": available,
            "model": self.model_name,
            "model_dir": str(self.model_dir) if self.model_dir else None,
            "detail": str(self._failure[0]) if self._failure else None,
        }

    def load(self):
        """The Demucs model, loaded once; raises SeparationUnavailable."""
        with self._lock:
            if self._model is not None:
                return self._model
            if self._failure and time.monotonic() - self._failure[1] < RETRY_AFTER_FAILURE_S:
                raise self._failure[0]
            try:
                self._model = self._load()
            except SeparationUnavailable as exc:
                self._failure = (exc, time.monotonic())
                log.warning("vocal isolation unavailable: %s", exc.log_detail)
                raise
            self._failure = None
            log.info("vocal isolation model %r loaded on %s", self.model_name, self.device)
            return self._model

    def _load(self):
        try:
            from demucs.pretrained import get_model
        except ImportError as exc:
            raise SeparationUnavailable(
                f"vocal isolation needs the demucs package, which is not installed ({exc}); "
                "install it with: pip install demucs"
            ) from None
        if self.model_dir is not None and not self.model_dir.is_dir():
            fix = f"set --separation-model-dir to a directory holding {self.model_name}.th (or {self.model_name}.yaml)"
            raise SeparationUnavailable(
                f"the server's separation model directory (--separation-model-dir) does not exist; {fix}",
                f"separation model directory {self.model_dir} does not exist; {fix}",
            )
        try:
            model = get_model(self.model_name, repo=self.model_dir)
        except SystemExit:  # demucs calls sys.exit on some lookup failures
            model = None
        except Exception as exc:
            fix = "Put the model files in a directory and pass --separation-model-dir, or run once with network access"
            where = "in --separation-model-dir" if self.model_dir else "online (downloaded on first use) or in a local directory"
            raise SeparationUnavailable(
                # The exception's own text may name files of the server: the log's only.
                f"separation model {self.model_name!r} could not be loaded {where} ({type(exc).__name__}). {fix}",
                f"separation model {self.model_name!r} could not be loaded from {self.model_dir or 'the network'}: "
                f"{type(exc).__name__}: {exc}. {fix}",
            ) from None
        if model is None:
            raise SeparationUnavailable(f"separation model {self.model_name!r} was not found")
        if "vocals" not in list(model.sources):
            raise SeparationUnavailable(f"separation model {self.model_name!r} has no 'vocals' source ({model.sources})")
        return model.to(self.device).eval()

    def vocals(self, audio: np.ndarray, sr: int) -> np.ndarray:
        """The vocal stem of ``audio`` (mono or ``[channels, N]``), mono at ``sr``."""
        import torch
        from demucs.apply import apply_model

        model = self.load()
        x = np.atleast_2d(np.asarray(audio, dtype=np.float32))
        x = np.stack([resample(ch, sr, model.samplerate) for ch in x])
        if x.shape[0] != model.audio_channels:  # mono in, stereo model: duplicate; more: average
            x = np.repeat(x.mean(0, keepdims=True), model.audio_channels, axis=0)
        mix = torch.from_numpy(x)
        ref = mix.mean(0)
        mean, std = ref.mean(), ref.std() + 1e-8
        with torch.inference_mode():
            stems = apply_model(
                model, ((mix - mean) / std)[None], device=self.device, split=True, overlap=0.25, progress=False
            )[0]
        voice = stems[list(model.sources).index("vocals")] * std + mean
        return resample(voice.mean(0).cpu().numpy(), model.samplerate, sr)
