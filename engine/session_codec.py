"""A streaming session's state, and a chunk's answer, as bytes: what a shared
store (``engine.redis_sessions``) keeps between chunks so that any engine on
any node can apply the next one.

It owns the byte layout and nothing else: where the bytes live, and when
they are read or written, is the store's and ``engine.shared_streams``'s.

The one idea: a decoded state gives bit-for-bit the frames the encoded one
would have. Everything a later chunk reads is kept exactly (arrays as their
own float32/float64 bytes, the blink generator's full state), and nothing
else: of the stored frames, only what post-processing reads again
(``a2e.postprocess.history_parts``). The audio
context, most of a state's bytes, travels apart from the rest as pieces,
so that a store can append each chunk's new audio instead of writing the
whole window again: every later window reads only the last window of
samples, and how the pieces were cut changes no number. A piece holds its
samples losslessly: FLAC of the 16-bit integers where those are exact (16-bit
PCM, the usual input: ~18 KB for a second of speech instead of 32 KB), else
float32. A chunk's answer is kept as it is sent, to ``WEIGHT_DECIMALS``
decimals, as integers (its retry renders the very same text).

Layout: ``A2S1``, a little-endian u32 header length, a JSON header (scalars,
and per array its name, dtype and shape), then the arrays back to back;
stored as ``A2Z1`` and that record deflated.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Sequence

import numpy as np
import soundfile

from a2e.constants import SAMPLE_RATE, WEIGHT_DECIMALS, WINDOW_SAMPLES
from a2e.loudness import LoudnessMode, StreamLoudness
from a2e.postprocess import history_from_parts, history_parts
from a2e.streaming import ContextMode, StreamState
from a2e.tuning import Tuning

from .protocol import ChunkResult

MAGIC, DEFLATED = b"A2S1", b"A2Z1"
_HEAD = struct.Struct("<4sI")
# A stored audio piece: one tag byte, then the samples (FLAC: their count, then the stream).
_INT16, _FLOAT32, _FLAC = b"s", b"f", b"c"
_COUNT = struct.Struct("<I")
_INT16_STEP = np.float32(1 / 32768)
# Below this FLAC's own headers outweigh what it saves.
_FLAC_MIN_SAMPLES = 1024
# zlib's fastest level: most of what deflate finds in a state (its JSON
# header, the rng's words) for a few µs.
_DEFLATE_LEVEL = 1
_SCALE = 10.0**WEIGHT_DECIMALS


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
    return DEFLATED + zlib.compress(b"".join([_HEAD.pack(MAGIC, len(text)), text, *blobs]), _DEFLATE_LEVEL)


def unpack(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """The header and arrays ``pack`` wrote (arrays are copies: writable, owning their memory)."""
    if data[:4] == DEFLATED:
        try:
            data = zlib.decompress(data[4:])
        except zlib.error as exc:
            raise CodecError(f"session record does not inflate ({exc})") from None
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


def audio_tail(state: StreamState, samples: int) -> bytes:
    """The last ``samples`` of the session's audio context (at most a window)
    as a stored piece (``encode_audio``), for ``decode_state``."""
    samples = min(samples, WINDOW_SAMPLES)
    if samples <= 0 or not state.context:
        return b""
    return encode_audio(state.recent_audio(samples))


def encode_audio(samples: np.ndarray) -> bytes:
    """float32 samples as a stored piece: as 16-bit integers where that gives
    back the very same bits (16-bit PCM, the usual input, is k/32768 once
    decoded), FLAC-coded where that is shorter (speech: ~57 %, for ~0.3 ms a
    second of audio at FLAC's fastest level), else as they are."""
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    with np.errstate(invalid="ignore"):  # NaN or out of range: not exact, kept as float32
        ints = (samples * np.float32(32768)).astype(np.int16)
    if (ints.astype(np.float32) * _INT16_STEP).tobytes() != samples.tobytes():
        return _FLOAT32 + samples.tobytes()
    raw = ints.tobytes()
    if len(ints) >= _FLAC_MIN_SAMPLES:
        out = io.BytesIO()
        soundfile.write(out, ints, SAMPLE_RATE, format="FLAC", subtype="PCM_16", compression_level=0.0)
        if out.tell() + _COUNT.size < len(raw):
            return _FLAC + _COUNT.pack(len(ints)) + out.getvalue()
    return _INT16 + raw


def decode_audio(piece: bytes) -> np.ndarray:
    """The float32 samples ``encode_audio`` stored."""
    tag, body = piece[:1], memoryview(piece)[1:]
    if tag == _INT16 and len(body) % 2 == 0:
        return np.frombuffer(body, np.int16).astype(np.float32) * _INT16_STEP
    if tag == _FLOAT32 and len(body) % 4 == 0:
        return np.frombuffer(body, np.float32)
    if tag == _FLAC and len(body) > _COUNT.size:
        try:
            ints, _ = soundfile.read(io.BytesIO(body[_COUNT.size :]), dtype="int16")
        except (soundfile.LibsndfileError, RuntimeError) as exc:
            raise CodecError(f"a piece of session audio does not decode ({exc})") from None
        if len(ints) == _COUNT.unpack_from(body)[0]:
            return ints.astype(np.float32) * _INT16_STEP
    raise CodecError("not a piece of session audio")


def piece_samples(piece: bytes) -> int:
    """How many samples a stored piece holds (without decoding it)."""
    if piece[:1] == _FLAC:
        return _COUNT.unpack_from(piece, 1)[0]
    return (len(piece) - 1) // (2 if piece[:1] == _INT16 else 4)


def encode_state(state: StreamState) -> bytes:
    """Everything of the state but its audio context (see ``audio_tail``)."""
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
    tail, eyes = (None, None) if state.previous_frames is None else history_parts(state.previous_frames)
    arrays: dict[str, np.ndarray | None] = {
        "previous_tail": tail,
        "previous_eyes": eyes,
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


def decode_state(data: bytes, audio: Sequence[bytes] = ()) -> StreamState:
    """The state ``encode_state`` wrote, with ``audio`` (float32 pieces, oldest
    first) as its context; without them, the context is empty (enough to
    say where a session stands, not to apply its next chunk)."""
    h, a = unpack(data)
    rng_state = h["rng"]
    rng = np.random.Generator(getattr(np.random, rng_state["bit_generator"])())
    rng.bit_generator.state = rng_state
    joined = np.concatenate([decode_audio(piece) for piece in audio])[-WINDOW_SAMPLES:].copy() if len(audio) else None
    state = StreamState(
        identity=h["identity"],
        rng=rng,
        mode=ContextMode(h["mode"]),
        context=(joined,) if joined is not None and len(joined) else (),
        previous_frames=_previous_frames(a),
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


def _previous_frames(arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    if "previous_eyes" in arrays:
        return history_from_parts(arrays["previous_tail"], arrays["previous_eyes"])
    return arrays.get("previous_frames")  # a record written before the stored frames were cut down


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
    steps = _as_sent(result.frames)
    if steps is None:
        return pack(header, {"frames": result.frames})
    # Frame to frame a weight moves little: its differences, each weight's run
    # of frames together, split into byte planes (the high ones mostly 0 or
    # 255), deflate to 40-65 % of the float32 frames.
    moves = np.ascontiguousarray(np.diff(steps, axis=0, prepend=0).astype("<i4").T)
    planes = moves.view(np.uint8).reshape(-1, 4).T
    return pack({**header, "sent_steps": list(steps.shape)}, {"planes": planes})


def decode_answer(data: bytes) -> tuple[ChunkResult, int]:
    h, a = unpack(data)
    if h.get("sent_steps"):
        frames_n, weights_n = h["sent_steps"]
        moves = np.ascontiguousarray(a["planes"].T).view("<i4").reshape(weights_n, frames_n).T
        frames = (np.cumsum(moves, axis=0, dtype=np.int64) / _SCALE).astype(np.float32)
    else:
        frames = a["frames"]
    result = ChunkResult(frames, h["chunk_index"], h["audio_seconds"], h["start_time"], h["context_mode"])
    return result, h["digest"]


def _as_sent(frames: np.ndarray) -> np.ndarray | None:
    """The weights as every door sends them (rounded to ``WEIGHT_DECIMALS``),
    as integer steps, where float32 carries those steps back exactly (any
    weight under ~8); else None: kept as they are."""
    with np.errstate(invalid="ignore", over="ignore"):
        steps = np.rint(np.asarray(frames, dtype=np.float64) * _SCALE)
        if frames.size == 0 or not np.all(np.abs(steps) < 2**31):  # NaN fails too
            return None
        back = (steps / _SCALE).astype(np.float32)
        if not np.array_equal(np.rint(back.astype(np.float64) * _SCALE), steps):
            return None
    return steps.astype(np.int64)
