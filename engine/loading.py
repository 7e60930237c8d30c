"""Which model an engine serves and how fast: the weights the settings name
(LAM-A2E, a2e-lite, or the stub), loaded into a ``ModelRunner`` on the
engine's device, and the length limits that the measured speed allows.

It owns the choice of weights and the start-up measurement; it does not
start the batcher or serve anything (``engine.service`` does). Missing
weights are not an error here: the engine then serves not-ready (503), as
the API document describes, unless the user named a file that is not there.
Weights named ``hf://...`` are fetched into a local file first (``a2e.hub``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from a2e.checkpoint import load_model
from a2e.config import model_dims, read_config
from a2e.constants import WINDOW_SAMPLES
from a2e.errors import CheckpointError
from a2e.hub import RELEASED, is_hub_uri
from a2e.lite import load_lite
from batching import ModelRunner
from batching.stub import StubRunner
from runtime.settings import ROOT, Settings

from .protocol import Limits

log = logging.getLogger("a2e.service")

# Effective length limits keep a request's model time within this share of
# the response timeout, leaving the rest for queueing and everything else.
LIMIT_SHARE_OF_TIMEOUT = 0.5


@dataclass
class ModelInfo:
    name: str
    weights: str
    device: str
    dtype: str
    num_identities: int
    parameters: int
    runner_mode: str


@dataclass
class Loaded:
    """A model ready to run, or (``runner`` None) why there is none."""

    runner: ModelRunner | StubRunner | None
    info: ModelInfo | None
    not_ready_reason: str = ""


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _config(s: Settings) -> dict:
    config_path = s.resolve(s.config_file)
    return read_config(config_path) if config_path and config_path.exists() else {}


def fetch_hub_weights(s: Settings) -> Settings:
    """The settings with ``hf://`` weights (flag, environment or config file)
    fetched into a verified local file: downloaded and converted on first
    use, from the cache afterwards. Raises CheckpointError (a2e.hub.HubError)
    with the manual steps when they cannot be had; never falls back."""
    config = _config(s)
    weight = s.weight or config.get("weight")
    if s.model not in ("auto", "lam") or not is_hub_uri(weight):
        return s
    from a2e import hub

    path = hub.fetch(weight, model_dims(config, base_dir=ROOT))
    return replace(s, weight=str(path), sources={**s.sources, "weight": s.sources.get("weight", "file")})


def load_runner(s: Settings) -> Loaded:
    """Load the weights named by the settings. Missing weights give a
    ``Loaded`` without a runner (the server still starts); a file that is
    there but does not fit, or a ``--weight`` that is not there, raises
    CheckpointError."""
    if s.model == "stub":
        return Loaded(StubRunner(), ModelInfo("stub", "", "cpu", "fp32", StubRunner.num_identities, 0, "stub"))
    s = fetch_hub_weights(s)
    config = _config(s)
    lam_weights = s.resolve(s.weight or config.get("weight"))
    lite_weights = s.resolve(s.lite_weight)
    lam_there = lam_weights is not None and lam_weights.exists()
    use_lite = s.model == "a2e-lite" or (s.model == "auto" and not lam_there)
    if s.weight_is_explicit and s.model != "a2e-lite" and not lam_there:
        raise CheckpointError(
            f"weights file {lam_weights} (given with --weight) does not exist; fix the path, or leave --weight "
            "out to serve the built-in a2e-lite"
        )
    weights = lite_weights if use_lite else lam_weights
    if weights is None or not weights.exists():
        hint = "" if use_lite else f"; to download the released LAM-A2E model, start with --weight {RELEASED}"
        log.warning(
            "no model weights found at %s; serving without a model (inference answers 503). "
            "See pretrained_models/README.md%s",
            weights or "(none configured)",
            hint,
        )
        return Loaded(None, None, f"no model weights found at {weights.name if weights else '(none configured)'}{hint}")
    if s.cpu_threads > 0:
        torch.set_num_threads(s.cpu_threads)
    device = resolve_device(s.device)
    t0 = time.perf_counter()
    if use_lite:
        model, name = load_lite(weights), "a2e-lite"
        num_ids = model.dims.num_identity_classes
        if s.model == "auto":
            log.info("no LAM-A2E weights at %s: using the built-in a2e-lite model", lam_weights)
    else:
        dims = model_dims(config, base_dir=ROOT)
        model = load_model(weights, dims, "cpu")
        name = "lam-a2e" + ("-transformer" if dims.use_transformer else "")
        num_ids = dims.num_identity_classes
    params = sum(p.numel() for p in model.parameters())
    runner = ModelRunner(model, device, dtype=s.dtype, max_batch=s.max_batch, cuda_graphs=s.cuda_graphs, compile=s.compile)
    log.info(
        "model loaded: %s from %s (%.1f M parameters, %d identities) on %s/%s, %s, in %.1f s",
        name, weights, params / 1e6, num_ids, device, s.dtype, runner.mode, time.perf_counter() - t0,
    )  # fmt: skip
    return Loaded(runner, ModelInfo(name, str(weights), device, s.dtype, num_ids, params, runner.mode))


def effective_limits(s: Settings, runner: ModelRunner | StubRunner) -> Limits:
    """Time one full batch of windows and lower the length limits so that a
    request's model time stays within half the response timeout."""
    if not s.auto_limits:
        return Limits(s.max_audio_s, s.max_chunk_s)
    windows = np.zeros((s.max_batch, WINDOW_SAMPLES), dtype=np.float32)
    identities = np.zeros(s.max_batch, dtype=np.int64)
    runner.run_windows(windows, identities)  # warm-up
    # The fastest of three: what the device can do, not what a busy
    # moment at start-up (other processes loading) let it do.
    timings = []
    for _ in range(3):
        t0 = time.perf_counter()
        runner.run_windows(windows, identities)
        timings.append(time.perf_counter() - t0)
    per_window = max(min(timings) / s.max_batch, 1e-6)
    # A long clip runs one window per second of audio; a chunk one per 2 s.
    speed = 1.0 / per_window
    budget = s.response_timeout_s * LIMIT_SHARE_OF_TIMEOUT
    limits = Limits(
        max_audio_s=min(s.max_audio_s, max(1.0, math.floor(speed * budget))),
        max_chunk_s=min(s.max_chunk_s, max(1.0, math.floor(2 * speed * budget))),
        audio_s_per_s=round(speed, 1),
    )
    if limits.max_audio_s < s.max_audio_s or limits.max_chunk_s < s.max_chunk_s:
        log.warning(
            "this model processes %.1f s of audio per second here: limits lowered to %g s per clip and %g s per "
            "chunk so requests finish within the %g s response timeout (--auto-limits off keeps the configured ones)",
            speed, limits.max_audio_s, limits.max_chunk_s, s.response_timeout_s,
        )
    return limits
