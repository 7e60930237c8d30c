"""Animation targets for a2e-lite: timed phonemes -> visemes -> 52 ARKit weights at 30 fps.

* Each phoneme symbol (SAMPA-like, as MBROLA and espeak-ng write them) maps to
  one of 15 visemes; diphthongs split into their two vowels.
* Coarticulation: every segment exerts a Gaussian "dominance" around its
  centre; the weights at a frame are the dominance-weighted mean of the
  visemes around it, so neighbours blend. Bilabials dominate strongly, so
  lips close on p/b/m even in fast speech. Frames are sampled 90 ms ahead of
  the audio: lips anticipate the sound (90 ms is where LAM's mouth opening
  lines up best with ours on the shared English clip).
* Intensity follows loudness (a smoothed RMS envelope), and the mouth rests
  closed and neutral in silence.
* ``apply_style`` turns the neutral targets into the 12 identities' styles.

The viseme table moves the channels LAM moves, in similar ranges (see the
released model's output for the English clip in ../shared/reference).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import maximum_filter1d

from a2e.constants import ARKIT_NAMES, FPS, SAMPLE_RATE, channel_index

LEAD_S = 0.09
_STRIP = "'\",:;%=#!|^~/"  # stress and length marks; "." stays: it marks retroflexes (ts., s.)


def _vec(**weights: float) -> np.ndarray:
    v = np.zeros(len(ARKIT_NAMES), dtype=np.float32)
    for name, value in weights.items():
        for full in (name, name + "Left", name + "Right"):
            if full in ARKIT_NAMES:
                v[channel_index(full)] = value
    return v


VISEMES: dict[str, np.ndarray] = {
    "sil": _vec(),
    "PP": _vec(mouthClose=0.35, mouthPress=0.35, mouthRollLower=0.10, mouthShrugUpper=0.30, jawOpen=0.02),
    "FF": _vec(mouthRollLower=0.35, mouthUpperUp=0.20, mouthLowerDown=0.05, jawOpen=0.06, mouthShrugUpper=0.20),
    "TH": _vec(jawOpen=0.10, tongueOut=0.15, mouthLowerDown=0.25, mouthShrugUpper=0.25),
    "DD": _vec(jawOpen=0.10, mouthLowerDown=0.30, mouthStretch=0.10, mouthShrugUpper=0.30),
    "SS": _vec(jawOpen=0.04, mouthStretch=0.20, mouthSmile=0.08, mouthLowerDown=0.20, mouthUpperUp=0.10),
    "CH": _vec(mouthFunnel=0.30, mouthPucker=0.25, jawOpen=0.08, mouthLowerDown=0.30, mouthUpperUp=0.20),
    "kk": _vec(jawOpen=0.12, mouthLowerDown=0.30, mouthShrugUpper=0.30),
    "RR": _vec(mouthPucker=0.20, mouthFunnel=0.20, jawOpen=0.08, mouthLowerDown=0.25),
    "aa": _vec(jawOpen=0.32, mouthLowerDown=0.70, mouthUpperUp=0.20, mouthShrugUpper=0.50, mouthStretch=0.10),
    "E": _vec(jawOpen=0.20, mouthLowerDown=0.55, mouthStretch=0.20, mouthSmile=0.05, mouthShrugUpper=0.45),
    "I": _vec(jawOpen=0.08, mouthStretch=0.25, mouthSmile=0.10, mouthLowerDown=0.35, mouthShrugUpper=0.40),
    "O": _vec(jawOpen=0.22, mouthFunnel=0.30, mouthPucker=0.25, mouthLowerDown=0.45, mouthShrugUpper=0.35),
    "U": _vec(jawOpen=0.08, mouthPucker=0.45, mouthFunnel=0.20, mouthLowerDown=0.20, mouthShrugUpper=0.30),
}
# How strongly a viseme holds its ground against its neighbours.
DOMINANCE = {"sil": 1.0, "PP": 3.0, "FF": 2.0, "TH": 1.2, "CH": 1.5, "SS": 1.2, "DD": 0.7, "kk": 0.6, "RR": 1.0}
# Gaussian half-width: a share of the segment's duration plus a floor (s).
_WIDTH = {"PP": (0.30, 0.015), "sil": (0.45, 0.03)}
_DEFAULT_WIDTH = (0.45, 0.025)

_VOWELS = {
    "a": "aa", "A": "aa", "{": "aa", "6": "aa", "V": "aa", "&": "aa", "Q": "O",
    "e": "E", "E": "E", "@": "E", "3": "E", "8": "E",
    "i": "I", "I": "I", "1": "I",
    "o": "O", "O": "O",
    "u": "U", "U": "U", "y": "U", "Y": "U", "2": "U", "9": "U", "M": "U",
}  # fmt: skip


# Consonants by leading symbol, first match wins (affricates before their parts).
_CONSONANTS: list[tuple[tuple[str, ...], str]] = [
    (tuple("pbm"), "PP"),
    (tuple("fv"), "FF"),
    (tuple("TD"), "TH"),
    (("tS", "dZ", "S", "Z", "ts.", "s.", "z.", "tc", "c", "C", "J"), "CH"),
    (("s", "z", "ts", "dz"), "SS"),
    (tuple("tdnlL4"), "DD"),
    (tuple("kgNxXhHq?GR"), "kk"),
    (tuple("rP"), "RR"),
    (("w",), "U"),
    (("j",), "I"),
]


def _consonant(sym: str) -> str:
    return next((vis for prefixes, vis in _CONSONANTS if sym.startswith(prefixes)), "DD")


def visemes_of(symbol: str) -> list[str]:
    """The viseme(s) of one phoneme symbol: one, or two for a diphthong."""
    # Digits after the first character are tones (espeak's "i55"); a leading one is a phoneme ("4", a tap).
    sym = "".join(ch for i, ch in enumerate(symbol) if ch not in _STRIP and not (i and ch.isdigit()))
    if not sym or symbol.startswith("_"):
        return ["sil"]
    vowels = [_VOWELS[ch] for ch in sym if ch in _VOWELS]
    if sym[0] in _VOWELS or (sym[0] in "jw" and vowels and len(sym) > 1):
        if len(vowels) >= 2 and vowels[0] != vowels[-1]:
            return [vowels[0], vowels[-1]]
        return [vowels[0]] if vowels else ["E"]
    return [_consonant(sym)]


def _segments(phonemes: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    out = []
    for sym, start, end in phonemes:
        vis = visemes_of(sym)
        step = (end - start) / len(vis)
        out += [(v, start + i * step, start + (i + 1) * step) for i, v in enumerate(vis)]
    return out


def loudness_envelope(audio: np.ndarray, num_frames: int) -> np.ndarray:
    """0..1 per frame from the RMS level (-50 dBFS -> 0, -20 dBFS and up -> 1), smoothed.

    A running maximum over +-4 frames (133 ms) first, so the near-silent
    closure of a stop (the lips shut for p, b) still counts as speech."""
    hop = SAMPLE_RATE / FPS
    env = np.zeros(num_frames, dtype=np.float32)
    for f in range(num_frames):
        seg = audio[int(f * hop) : int((f + 1) * hop)]
        if len(seg):
            db = 10 * np.log10(np.mean(np.square(seg, dtype=np.float64)) + 1e-12)
            env[f] = np.clip((db + 50.0) / 30.0, 0.0, 1.0)
    env = maximum_filter1d(env, size=9, mode="nearest")
    kernel = np.array([0.25, 0.5, 0.25], dtype=np.float32)
    return np.convolve(np.pad(env, 1, mode="edge"), kernel, mode="valid")


def neutral_targets(phonemes: list[tuple[str, float, float]], audio: np.ndarray) -> np.ndarray:
    """``[T, 52]`` targets at 30 fps for a 16 kHz utterance and its phoneme timing."""
    num_frames = int(np.ceil(len(audio) / SAMPLE_RATE * FPS))
    t = np.arange(num_frames) / FPS + LEAD_S
    segs = _segments(phonemes)
    if not segs:
        return np.zeros((num_frames, len(ARKIT_NAMES)), dtype=np.float32)
    centres = np.array([(a + b) / 2 for _, a, b in segs])
    widths = np.array([_WIDTH.get(v, _DEFAULT_WIDTH)[0] * (b - a) + _WIDTH.get(v, _DEFAULT_WIDTH)[1] for v, a, b in segs])
    strength = np.array([DOMINANCE.get(v, 2.0) for v, _, _ in segs])  # vowels: 2.0
    values = np.stack([VISEMES[v] for v, _, _ in segs])
    dom = strength[None, :] * np.exp(-(((t[:, None] - centres[None, :]) / widths[None, :]) ** 2))
    dom += 1e-6 * (dom.sum(1, keepdims=True) == 0)  # far from every segment: rest
    mixed = (dom @ values) / (dom.sum(1, keepdims=True) + 1e-9)
    speaking = loudness_envelope(audio, num_frames)
    # Intensity follows loudness; a soft gate fades the mouth to rest in silence.
    gate = np.clip(speaking / 0.15, 0.0, 1.0)[:, None]
    return np.clip(mixed * (0.35 + 0.65 * speaking[:, None]) * gate, 0, 1).astype(np.float32)


# -- the 12 identities' speaking styles ---------------------------------------------------

_JAW = [channel_index(n) for n in ("jawOpen", "mouthLowerDownLeft", "mouthLowerDownRight")]
_LIPS = [
    channel_index(n)
    for n in (
        "mouthClose", "mouthPressLeft", "mouthPressRight", "mouthPucker", "mouthFunnel", "mouthRollLower",
        "mouthUpperUpLeft", "mouthUpperUpRight", "mouthStretchLeft", "mouthStretchRight", "mouthShrugUpper",
    )
]  # fmt: skip
_SMILE = [channel_index("mouthSmileLeft"), channel_index("mouthSmileRight")]
_STRETCH = [channel_index("mouthStretchLeft"), channel_index("mouthStretchRight")]
_PRESS = [channel_index("mouthPressLeft"), channel_index("mouthPressRight")]
_PUCKER = [channel_index("mouthPucker")]

# id: (name, articulation, jaw emphasis, lip emphasis, smile bias, stretch bias, press bias, pucker bias)
STYLES: list[tuple[str, float, float, float, float, float, float, float]] = [
    ("neutral", 1.00, 1.00, 1.00, 0.00, 0.00, 0.00, 0.00),
    ("crisp articulator", 1.30, 1.10, 1.20, 0.00, 0.00, 0.00, 0.00),
    ("soft, mumbling", 0.70, 0.80, 0.80, 0.00, 0.00, 0.00, 0.00),
    ("jaw-driven", 1.00, 1.40, 0.80, 0.00, 0.00, 0.00, 0.00),
    ("lip-driven", 1.00, 0.75, 1.40, 0.00, 0.00, 0.00, 0.00),
    ("smiling", 1.00, 1.00, 1.00, 0.25, 0.00, 0.00, 0.00),
    ("wide mouth", 1.10, 1.00, 1.00, 0.05, 0.15, 0.00, 0.00),
    ("rounded lips", 1.00, 0.90, 1.20, 0.00, 0.00, 0.00, 0.10),
    ("small mouth", 0.80, 0.70, 0.90, 0.00, 0.00, 0.00, 0.00),
    ("expressive, cheerful", 1.25, 1.20, 1.10, 0.15, 0.00, 0.00, 0.00),
    ("tense, pressed lips", 0.90, 0.80, 1.00, 0.00, 0.00, 0.12, 0.00),
    ("relaxed, open", 1.00, 1.25, 0.90, 0.05, 0.00, 0.00, 0.00),
]


def apply_style(targets: np.ndarray, identity: int) -> np.ndarray:
    _, art, jaw, lips, smile, stretch, press, pucker = STYLES[identity]
    out = np.array(targets, dtype=np.float32, copy=True)
    out[:, _JAW] *= art * jaw
    out[:, _LIPS] *= art * lips
    activity = np.clip(out[:, _JAW[0]] / 0.2, 0, 1)[:, None]  # biases show more while speaking
    out[:, _SMILE] += smile * (0.6 + 0.4 * activity)
    out[:, _STRETCH] += stretch * activity
    out[:, _PRESS] += press * (1 - activity)
    out[:, _PUCKER] += pucker * activity
    return np.clip(out, 0, 1)
