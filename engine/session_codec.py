"""A streaming session's state, and a chunk's answer, as bytes: what a shared
store (``engine.redis_sessions``) keeps between chunks so that any engine on
any node can apply the next one.

It owns the byte layout and nothing else: where the bytes live, and when
they are read or written, is the store's and ``engine.shared_streams``'s.

The one idea: a decoded state gives bit-for-bit the frames the encoded one
would have. Everything a later chunk reads is kept exactly (arrays as their
own float32/float64 bytes, the blink generator's full state); the audio
context is kept as its last window of samples in one piece, which is what
every later window reads (how the pieces were cut changes no number).

Layout: ``A2S1``, a little-endian u32 header length, a JSON header (scalars,
and per array its name, dtype and shape), then the arrays back to back.
"""

from __future__ import annotations

import json
import struct

import numpy as np

from a2e.constants import WINDOW_SAMPLES
from a2e.loudness import LoudnessMode, StreamLoudness
from a2e.streaming import ContextMode, StreamState
from a2e.tuning import Tuning

from .protocol import ChunkResult

MAGIC = b"A2S1"
_HEAD = struct.Struct("<4sI")


class CodecError(ValueError):
    """Bytes that are not a state or answer this version wrote."""


def pack(header: dict, arrays: dict[str, np.ndarray | None]) -> bytes:
    """``header`` (JSON-able) and named arrays (None: absent) as one byte string."""
    listed, blobs = [], []
    for name, array in arrays.items():
        if array is None:
            continue
        array = np.ascontiguousarray(array)
        listed.append([name, array.dtype.str, list(array.shape)])
        blobs.append(array.tobytes())
    text = json.dumps({**header, "arrays": listed}, separators=(",", ":")).encode()
    return b"".join([_HEAD.pack(MAGIC, len(text)), text, *blobs])


def unpack(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """The header and arrays ``pack`` wrote (arrays are copies: writable, owning their memory)."""
    if len(data) < _HEAD.size:
        raise CodecError("too short to be a session record")
    magic, size = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(f"not a session record (starts {magic!r})")
    at = _HEAD.size + size
    header = json.loads(data[_HEAD.size : at])
    arrays = {}
    for name, dtype, shape in header.pop("arrays"):
        dt = np.dtype(dtype)
        n = dt.itemsize * int(np.prod(shape, dtype=np.int64))
        arrays[name] = np.frombuffer(data, dt, int(np.prod(shape, dtype=np.int64)), at).reshape(shape).copy()
        at += n
    if at != len(data):
        raise CodecError("session record has trailing or missing bytes")
    return header, arrays


def _context(state: StreamState) -> np.ndarray:
    if not state.context:
        return np.zeros(0, dtype=np.float32)
    joined = state.context[0] if len(state.context) == 1 else np.concatenate(state.context)
    return joined[-WINDOW_SAMPLES:]


def encode_state(state: StreamState) -> bytes:
    header = {
        "identity": int(state.identity),
        "rng": state.rng.bit_generator.state,
        "mode": state.mode.value,
        "frames_sent": state.frames_sent,
        "frames_planned": state.frames_planned,
        "samples_received": state.samples_received,
        "loudness_mode": state.loudness_mode.value,
        "loudness": None,
        "tuning": None,
    }
    arrays: dict[str, np.ndarray | None] = {
        "context": _context(state),
        "previous_frames": state.previous_frames,
        "previous_volume": state.previous_volume,
        "tuned_last": state.tuned_last,
    }
    if state.loudness is not None:
        header["loudness"] = {"target_lufs": state.loudness.target_lufs, "gain_db": state.loudness.gain_db}
        arrays["loudness_history"] = state.loudness.history
    if state.tuning is not None:
        header["tuning"] = {"clamp": bool(state.tuning.clamp)}
        arrays.update(tuning_scale=state.tuning.scale, tuning_shift=state.tuning.shift, tuning_smoothing=state.tuning.smoothing)
    return pack(header, arrays)


def decode_state(data: bytes) -> StreamState:
    h, a = unpack(data)
    rng_state = h["rng"]
    rng = np.random.Generator(getattr(np.random, rng_state["bit_generator"])())
    rng.bit_generator.state = rng_state
    context = a["context"]
    state = StreamState(
        identity=h["identity"],
        rng=rng,
        mode=ContextMode(h["mode"]),
        context=(context,) if len(context) else (),
        previous_frames=a.get("previous_frames"),
        previous_volume=a.get("previous_volume"),
        frames_sent=h["frames_sent"],
        frames_planned=h["frames_planned"],
        samples_received=h["samples_received"],
        loudness_mode=LoudnessMode(h["loudness_mode"]),
        tuned_last=a.get("tuned_last"),
    )
    if h["loudness"] is not None:
        loudness = StreamLoudness(h["loudness"]["target_lufs"])
        loudness.gain_db = h["loudness"]["gain_db"]
        loudness.history = a["loudness_history"]
        state.loudness = loudness
    if h["tuning"] is not None:
        state.tuning = Tuning(a["tuning_scale"], a["tuning_shift"], a["tuning_smoothing"], h["tuning"]["clamp"])
    return state


def encode_answer(result: ChunkResult, digest: int) -> bytes:
    """A chunk's answer, kept so that a retry of that chunk gets it again;
    ``digest`` identifies the chunk's audio (a retry must bring the same)."""
    header = {
        "chunk_index": result.chunk_index,
        "audio_seconds": result.audio_seconds,
        "start_time": result.start_time,
        "context_mode": result.context_mode,
        "digest": digest,
    }
    return pack(header, {"frames": result.frames})


def decode_answer(data: bytes) -> tuple[ChunkResult, int]:
    h, a = unpack(data)
    result = ChunkResult(a["frames"], h["chunk_index"], h["audio_seconds"], h["start_time"], h["context_mode"])
    return result, h["digest"]
