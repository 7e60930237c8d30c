"""Per-session tuning of the output: what Audio2Face-3D's clients send as face
parameters and blend-shape multipliers/offsets, mapped onto our 52 channels.

A spec is a plain JSON-able dict (the REST init body's and the WebSocket
start message's ``tuning``; the gRPC header is converted to one)::

    {"face_params": {"lowerFaceStrength": 1.3, "upperFaceSmoothing": 0.01, ...},
     "multipliers": {"JawOpen": 1.2, "mouthSmileLeft": 0.8, ...},
     "offsets": {"EyeBlinkLeft": 0.05, ...},
     "clamp": true}

``parse`` validates it into a ``Tuning``; ``apply`` runs it over frames.
Per frame and channel, in this order:

1. smoothing (``upperFaceSmoothing``/``lowerFaceSmoothing``): a one-pole
   low-pass with that time constant in seconds, carried across chunks;
2. face strengths and offsets, then the blend-shape multipliers and offsets,
   folded into one ``x * scale + shift``;
3. clamping to [0, 1] when asked.

An absent or neutral spec changes nothing (``parse`` answers None), so an
untuned session's frames are bit for bit those of the pipeline without
tuning. Names are matched without regard to case, so ARKit's
``jawOpen`` and Audio2Face-3D's ``JawOpen`` both work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .constants import ARKIT_NAMES, FPS, NUM_BLENDSHAPES, channel_index
from .errors import A2EError


class TuningError(A2EError, ValueError):
    """A tuning spec that cannot be honoured as given (bad name, type or range)."""


# Audio2Face-3D 2.x names: the ARKit names capitalised, in our channel order.
A2F_NAMES: tuple[str, ...] = tuple(name[0].upper() + name[1:] for name in ARKIT_NAMES)
# Its tongue shapes beyond ARKit's tongueOut: accepted in multipliers and
# offsets (its sample configs list them), reported as ignored.
A2F_TONGUE_NAMES: tuple[str, ...] = tuple(
    "Tongue" + s
    for s in (
        "TipUp", "TipDown", "TipLeft", "TipRight", "RollUp", "RollDown", "RollLeft", "RollRight",
        "Up", "Down", "Left", "Right", "In", "Stretch", "Wide", "Narrow",
    )
)  # fmt: skip
_BY_LOWER = {name.lower(): i for i, name in enumerate(ARKIT_NAMES)}
_TONGUE_LOWER = {name.lower() for name in A2F_TONGUE_NAMES}

_BLINKS = np.array([channel_index("eyeBlinkLeft"), channel_index("eyeBlinkRight")])
# Upper face: brows, eyes (blinks have their own strength), cheek squint, nose.
# Lower face: jaw, mouth, cheek puff, tongue. Blinks are never smoothed: a
# smoothed blink is a half-closed eye.
_UPPER = np.array(
    [i for i, n in enumerate(ARKIT_NAMES) if n.startswith(("brow", "eye", "cheekSquint", "noseSneer")) and i not in _BLINKS]
)
_LOWER = np.array([i for i, n in enumerate(ARKIT_NAMES) if n.startswith(("jaw", "mouth", "cheekPuff", "tongue"))])
_MOUTH_CLOSE = channel_index("mouthClose")

# Face parameters we honour: name -> (lowest, highest, neutral), the ranges
# Audio2Face-3D documents for them.
HONOURED: dict[str, tuple[float, float, float]] = {
    "upperFaceStrength": (0.0, 2.0, 1.0),
    "lowerFaceStrength": (0.0, 2.0, 1.0),
    "upperFaceSmoothing": (0.0, 0.1, 0.0),
    "lowerFaceSmoothing": (0.0, 0.1, 0.0),
    "blinkStrength": (0.0, 2.0, 1.0),
    "blinkOffset": (-1.0, 1.0, 0.0),
    "eyelidOpenOffset": (-1.0, 1.0, 0.0),
    "lipOpenOffset": (-0.2, 0.2, 0.0),
}
# Face parameters of Audio2Face-3D that have no counterpart in a 52-channel
# output (they act on its mesh, tongue or emotion network): accepted, reported.
NOT_HONOURED = (
    "skinStrength", "faceMaskLevel", "faceMaskSoftness", "tongueStrength", "tongueHeightOffset",
    "tongueDepthOffset", "inputStrength", "lowerTeethStrength", "lowerTeethHeightOffset",
    "lowerTeethDepthOffset", "eyeballsStrength", "saccadeStrength", "rightEyeRotXOffset",
    "rightEyeRotYOffset", "leftEyeRotXOffset", "leftEyeRotYOffset", "blinkInterval", "eyeSaccadeSeed",
)  # fmt: skip
_HONOURED_LOWER = {name.lower(): name for name in HONOURED}
_FLOAT32_SLACK = 1e-6
MAX_REPORTED = 20  # ignored parameters listed back at most
# Multipliers and offsets beyond this are mistakes, and would overflow float32 weights.
MAX_FACTOR = 100.0


@dataclass(frozen=True)
class Tuning:
    scale: np.ndarray  # [52] float32: what each channel is multiplied by
    shift: np.ndarray  # [52] float32: then added
    smoothing: np.ndarray  # [52] float64: per-frame low-pass coefficient (1: none)
    clamp: bool

    @property
    def smooths(self) -> bool:
        return bool((self.smoothing < 1.0).any())


@dataclass
class Parsed:
    tuning: Tuning | None  # None: nothing to do
    ignored: tuple[str, ...]


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TuningError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise TuningError(f"{what} must be finite, got {value!r}")
    return value


def _mapping(spec: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = spec.get(key) or {}
    if not isinstance(value, Mapping):
        raise TuningError(f"tuning.{key} must be an object of name -> number")
    return value


def _per_channel(values: Mapping[str, Any], what: str, neutral: float, ignored: list[str]) -> np.ndarray:
    out = np.full(NUM_BLENDSHAPES, neutral, dtype=np.float64)
    for name, raw in values.items():
        key = str(name).lower()
        value = _number(raw, f"tuning.{what}[{name!r}]")
        if not -MAX_FACTOR <= value <= MAX_FACTOR:
            raise TuningError(f"tuning.{what}[{name!r}] must be between {-MAX_FACTOR:g} and {MAX_FACTOR:g}, got {value:g}")
        if key in _BY_LOWER:
            out[_BY_LOWER[key]] = value
        elif key in _TONGUE_LOWER:
            if value != neutral:
                ignored.append(f"{what}.{name} (no such channel: we output ARKit's 52)")
        else:
            raise TuningError(f"tuning.{what}: unknown blend shape {name!r}; the names are ARKit's 52 (either capitalisation)")
    return out


def smoothing_coefficient(time_constant_s: float, fps: float = FPS) -> float:
    """One-pole low-pass coefficient for a time constant: 1 means no smoothing."""
    if time_constant_s <= 0.0:
        return 1.0
    return 1.0 - math.exp(-1.0 / (fps * time_constant_s))


def parse(spec: Mapping[str, Any] | None) -> Parsed:
    """Validate a spec. Raises TuningError for what cannot be meant (unknown
    blend shapes, values of the wrong type or out of range); parameters we
    cannot honour are returned in ``ignored``."""
    if spec is None:
        return Parsed(None, ())
    if not isinstance(spec, Mapping):
        raise TuningError("tuning must be an object with face_params, multipliers, offsets and clamp")
    unknown_keys = set(spec) - {"face_params", "multipliers", "offsets", "clamp"}
    if unknown_keys:
        raise TuningError(f"tuning has unknown fields {sorted(unknown_keys)}; expected face_params, multipliers, offsets, clamp")
    ignored: list[str] = []
    face = {name: neutral for name, (_, _, neutral) in HONOURED.items()}
    for name, raw in _mapping(spec, "face_params").items():
        canonical = _HONOURED_LOWER.get(str(name).lower())
        if canonical is None:
            ignored.append(f"face_params.{str(name)[:64]}" + ("" if name in NOT_HONOURED else " (unknown)"))
            continue
        value = _number(raw, f"tuning.face_params.{name}")
        lo, hi, _ = HONOURED[canonical]
        # gRPC carries float32: 0.1 arrives as 0.10000000149.
        if not lo - _FLOAT32_SLACK <= value <= hi + _FLOAT32_SLACK:
            raise TuningError(f"tuning.face_params.{name} must be between {lo:g} and {hi:g}, got {value:g}")
        face[canonical] = min(max(value, lo), hi)
    multipliers = _per_channel(_mapping(spec, "multipliers"), "multipliers", 1.0, ignored)
    offsets = _per_channel(_mapping(spec, "offsets"), "offsets", 0.0, ignored)
    clamp = spec.get("clamp", False)
    if not isinstance(clamp, bool):
        raise TuningError(f"tuning.clamp must be true or false, got {clamp!r}")

    face_scale = np.ones(NUM_BLENDSHAPES)
    face_scale[_UPPER] = face["upperFaceStrength"]
    face_scale[_LOWER] = face["lowerFaceStrength"]
    face_scale[_BLINKS] = face["blinkStrength"]
    face_shift = np.zeros(NUM_BLENDSHAPES)
    # An open eyelid is less blink; an open lip is less mouthClose.
    face_shift[_BLINKS] = face["blinkOffset"] - face["eyelidOpenOffset"]
    face_shift[_MOUTH_CLOSE] = -face["lipOpenOffset"]
    smoothing = np.ones(NUM_BLENDSHAPES)
    smoothing[_UPPER] = smoothing_coefficient(face["upperFaceSmoothing"])
    smoothing[_LOWER] = smoothing_coefficient(face["lowerFaceSmoothing"])

    if len(ignored) > MAX_REPORTED:  # told back to the client and logged: bounded
        ignored[MAX_REPORTED:] = [f"... and {len(ignored) - MAX_REPORTED} more"]
    scale = face_scale * multipliers
    shift = face_shift * multipliers + offsets
    neutral = (scale == 1.0).all() and (shift == 0.0).all() and (smoothing == 1.0).all() and not clamp
    if neutral:
        return Parsed(None, tuple(ignored))
    tuning = Tuning(scale.astype(np.float32), shift.astype(np.float32), smoothing, clamp)
    return Parsed(tuning, tuple(ignored))


def apply(frames: np.ndarray, tuning: Tuning, last: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Tune ``frames`` [T, 52]; ``last`` is the smoothed frame before them (None
    at a session's start). Returns the tuned frames (a new array) and the
    new ``last``. Smoothing runs on the untuned values, so changing a
    multiplier never changes how a channel is smoothed."""
    out = np.asarray(frames, dtype=np.float64)
    if tuning.smooths and len(out):
        smoothed = np.empty_like(out)
        a = tuning.smoothing
        prev = out[0] if last is None else last
        for t in range(len(out)):
            prev = prev + a * (out[t] - prev)
            smoothed[t] = prev
        out, last = smoothed, smoothed[-1].copy()
    tuned = (out * tuning.scale + tuning.shift).astype(np.float32)
    if tuning.clamp:
        np.clip(tuned, 0.0, 1.0, out=tuned)
    return tuned, last


def from_a2f_header(
    float_params: Mapping[str, float],
    multipliers: Mapping[str, float],
    offsets: Mapping[str, float],
    clamp: bool,
) -> dict[str, Any]:
    """An Audio2Face-3D stream header's tuning as a spec (for ``parse``)."""
    spec: dict[str, Any] = {}
    if float_params:
        spec["face_params"] = {k: float(v) for k, v in float_params.items()}
    if multipliers:
        spec["multipliers"] = {k: float(v) for k, v in multipliers.items()}
    if offsets:
        spec["offsets"] = {k: float(v) for k, v in offsets.items()}
    if clamp:
        spec["clamp"] = True
    return spec
