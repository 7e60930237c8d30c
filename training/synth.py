"""Speech with exact phoneme timing, for a2e-lite's training data.

Two synthesisers, both from Debian packages (see training/README.md):

* MBROLA voices (diphones cut from real recordings) driven by espeak-ng:
  ``espeak-ng -v mb-XX --pho`` writes phonemes with durations, ``mbrola``
  renders exactly those; the timing is the .pho file's.
* espeak-ng's own voices through its library (Mandarin has no MBROLA voice
  espeak-ng can drive): phoneme events carry their sample positions.

Both give ``Utterance(audio at 16 kHz, phonemes=[(symbol, start_s, end_s)])``.
"""

from __future__ import annotations

import ctypes
import random
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from a2e.audio import resample

SAMPLE_RATE = 16000
MBROLA_DIR = Path("/usr/share/mbrola")


@dataclass
class Utterance:
    audio: np.ndarray  # float32, 16 kHz
    phonemes: list[tuple[str, float, float]]  # (symbol, start s, end s); "_" is a pause
    language: str
    voice: str
    text: str


def parse_pho(text: str) -> list[tuple[str, float, float]]:
    """MBROLA .pho lines ``symbol duration_ms [pitch points]`` -> timed segments."""
    out, t = [], 0.0
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0].startswith(";"):
            continue
        dur = float(parts[1]) / 1000.0
        out.append((parts[0], t, t + dur))
        t += dur
    return out


def mbrola_utterance(voice: str, text: str, language: str, speed: int = 160, pitch: int = 50) -> Utterance | None:
    """Synthesise ``text`` with MBROLA voice ``voice`` (e.g. "us1"); None if it produced nothing."""
    pho = subprocess.run(
        ["espeak-ng", "-v", f"mb-{voice}", "-s", str(speed), "-p", str(pitch), "-q", "--pho", text],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    segments = parse_pho(pho)
    if not segments:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        pho_path, wav_path = Path(tmp) / "u.pho", Path(tmp) / "u.wav"
        pho_path.write_text(pho)
        proc = subprocess.run(
            ["mbrola", "-e", str(MBROLA_DIR / voice / voice), str(pho_path), str(wav_path)],
            capture_output=True,
            timeout=60,
        )
        if proc.returncode != 0 or not wav_path.exists():
            return None
        audio, sr = sf.read(wav_path, dtype="float32")
    audio = resample(audio, sr, SAMPLE_RATE)
    # mbrola's output matches the .pho durations; trim the timing to the audio we have.
    end = len(audio) / SAMPLE_RATE
    segments = [(s, a, min(b, end)) for s, a, b in segments if a < end]
    return Utterance(audio, segments, language, f"mb-{voice}", text)


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))
_EVENT_PHONEME, _EVENT_END = 7, 5


class EspeakLibrary:
    """espeak-ng through libespeak-ng with phoneme events (synchronous mode)."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libespeak-ng.so.1")
        # AUDIO_OUTPUT_SYNCHRONOUS = 2; espeakINITIALIZE_PHONEME_EVENTS = 1
        self.rate = self.lib.espeak_Initialize(2, 0, None, 1)
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[str, int]] = []
        self._cb = _CALLBACK(self._collect)  # keep a reference: the library holds the pointer
        self.lib.espeak_SetSynthCallback(self._cb)

    def _collect(self, wav, n, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != 0:
            e = events[i]
            if e.type == _EVENT_PHONEME:
                self._events.append((e.id.decode("latin-1").rstrip("\x00"), e.sample))
            i += 1
        return 0

    def utterance(self, voice: str, text: str, language: str, speed: int = 160, pitch: int = 50) -> Utterance | None:
        self._chunks, self._events = [], []
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        self.lib.espeak_SetParameter(1, speed, 0)  # espeakRATE
        self.lib.espeak_SetParameter(3, pitch, 0)  # espeakPITCH
        data = text.encode("utf-8")
        self.lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 1, None, None)  # POS_CHARACTER, espeakCHARS_UTF8
        self.lib.espeak_Synchronize()
        if not self._chunks:
            return None
        audio = np.concatenate(self._chunks).astype(np.float32) / 32768.0
        total = len(audio)
        marks = [(sym, pos) for sym, pos in self._events if not sym.startswith("(")]  # drop language switches
        segments = []
        for (sym, pos), nxt in zip(marks, marks[1:] + [("", total)]):
            if nxt[1] > pos:
                segments.append(("_" if sym.startswith("_") else sym, pos / self.rate, nxt[1] / self.rate))
        return Utterance(resample(audio, self.rate, SAMPLE_RATE), segments, language, f"espeak-{voice}", text)


# -- text --------------------------------------------------------------------------------

WORDLISTS = {
    "en": "/usr/share/dict/american-english",
    "de": "/usr/share/dict/ngerman",
    "fr": "/usr/share/dict/french",
    "es": "/usr/share/dict/spanish",
    "it": "/usr/share/dict/italian",
    "nl": "/usr/share/dict/dutch",
    "pt": "/usr/share/dict/portuguese",
}
_KANA = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわん" "がぎぐげござじずぜぞだでどばびぶべぼぱぴぷぺぽ"
_PINYIN_INITIALS = ["", "b", "p", "m", "f", "d", "t", "n", "l", "g", "k", "h", "j", "q", "x", "zh", "ch", "sh", "r", "z", "c", "s", "y", "w"]
_PINYIN_FINALS = ["a", "o", "e", "ai", "ei", "ao", "ou", "an", "en", "ang", "eng", "ong", "i", "u", "ia", "ie", "iao", "iu", "ian", "in", "ing", "uo", "uai", "ui", "uan", "un"]


def load_words(language: str) -> list[str]:
    words = Path(WORDLISTS[language]).read_text(encoding="utf-8", errors="ignore").split()
    return [w for w in words if w.isalpha() and "'" not in w and 2 <= len(w) <= 12]


def sentence(language: str, rng: random.Random, words: list[str] | None, n_words: int) -> str:
    """A random sentence; commas and full stops make pauses."""
    if language == "ja":
        tokens = ["".join(rng.choice(_KANA) for _ in range(rng.randint(2, 5))) for _ in range(n_words)]
        joiner, comma, stop = "", "、", "。"
    elif language == "zh":
        tokens = [
            "".join(f"{rng.choice(_PINYIN_INITIALS)}{rng.choice(_PINYIN_FINALS)}{rng.randint(1, 4)}" for _ in range(rng.randint(1, 2)))
            for _ in range(n_words)
        ]
        joiner, comma, stop = " ", ",", "."
    else:
        tokens = [rng.choice(words) for _ in range(n_words)]
        joiner, comma, stop = " ", ",", "."
    out = []
    for i, tok in enumerate(tokens):
        out.append(tok)
        if i < len(tokens) - 1 and rng.random() < 0.12:
            out[-1] += comma
    return joiner.join(out) + stop
