"""Animation ``[T, 52]`` (ARKit order, 30 fps) in the formats users' engines read.

* ``json``: the API document's layout (``server/responses.py``), the default.
* ``json_named``: frames keyed by blend-shape name, for code that looks
  channels up by name.
* ``csv``: Live Link Face's CSV (Unreal Engine's iPhone capture app):
  ``Timecode, BlendShapeCount`` and 61 columns, the 52 blend shapes in
  Apple's ``ARFaceAnchor`` order with capitalised names, then the head and
  eye rotations (zeros: the model does not move the head or the eyeballs).
* ``gltf``: a binary glTF 2.0 (``.glb``) whose animation drives the morph
  target weights of a small mesh with 52 targets named as ARKit does; a
  viewer or engine retargets it to any mesh with the same target names.
* ``ndjson``: one JSON object per line, a header line then one per frame,
  for tools that read as they go.

Each function is pure: frames in, bytes out.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from .constants import ARKIT_NAMES, FPS, WEIGHT_DECIMALS

FORMATS = {
    "json": "application/json",
    "json_named": "application/json",
    "csv": "text/csv; charset=utf-8",
    "gltf": "model/gltf-binary",
    "ndjson": "application/x-ndjson",
}
EXTENSIONS = {"json": "json", "json_named": "json", "csv": "csv", "gltf": "glb", "ndjson": "ndjson"}
DECIMALS = WEIGHT_DECIMALS

# Live Link Face's columns: Apple's ARFaceAnchor order, capitalised, then rotations.
LIVE_LINK_SHAPES = (
    "EyeBlinkLeft", "EyeLookDownLeft", "EyeLookInLeft", "EyeLookOutLeft", "EyeLookUpLeft", "EyeSquintLeft", "EyeWideLeft",
    "EyeBlinkRight", "EyeLookDownRight", "EyeLookInRight", "EyeLookOutRight", "EyeLookUpRight", "EyeSquintRight",
    "EyeWideRight", "JawForward", "JawLeft", "JawRight", "JawOpen", "MouthClose", "MouthFunnel", "MouthPucker",
    "MouthLeft", "MouthRight", "MouthSmileLeft", "MouthSmileRight", "MouthFrownLeft", "MouthFrownRight",
    "MouthDimpleLeft", "MouthDimpleRight", "MouthStretchLeft", "MouthStretchRight", "MouthRollLower", "MouthRollUpper",
    "MouthShrugLower", "MouthShrugUpper", "MouthPressLeft", "MouthPressRight", "MouthLowerDownLeft",
    "MouthLowerDownRight", "MouthUpperUpLeft", "MouthUpperUpRight", "BrowDownLeft", "BrowDownRight", "BrowInnerUp",
    "BrowOuterUpLeft", "BrowOuterUpRight", "CheekPuff", "CheekSquintLeft", "CheekSquintRight", "NoseSneerLeft",
    "NoseSneerRight", "TongueOut",
)  # fmt: skip
LIVE_LINK_ROTATIONS = (
    "HeadYaw", "HeadPitch", "HeadRoll", "LeftEyeYaw", "LeftEyePitch", "LeftEyeRoll", "RightEyeYaw", "RightEyePitch",
    "RightEyeRoll",
)  # fmt: skip
LIVE_LINK_COLUMNS = ("Timecode", "BlendShapeCount", *LIVE_LINK_SHAPES, *LIVE_LINK_ROTATIONS)
_LIVE_LINK_ORDER = np.array([[n.lower() for n in ARKIT_NAMES].index(s.lower()) for s in LIVE_LINK_SHAPES])


def _rounded(frames: np.ndarray) -> list[list[float]]:
    return np.round(np.asarray(frames, dtype=np.float64), DECIMALS).tolist()


def json_named(frames: np.ndarray, fps: float = FPS, **metadata: Any) -> bytes:
    rows = _rounded(frames)
    body = {
        "fps": float(fps),
        "frame_count": len(rows),
        "metadata": metadata,
        "frames": [{"time": k / fps, "blendshapes": dict(zip(ARKIT_NAMES, row))} for k, row in enumerate(rows)],
    }
    return json.dumps(body, ensure_ascii=False).encode()


def live_link_timecode(seconds: float, fps: float = FPS) -> str:
    """``HH:MM:SS:FF.mmm`` as Live Link Face writes it (frame number, then its millisecond part)."""
    whole = int(seconds)
    frame = (seconds - whole) * fps
    h, m, s = whole // 3600, whole // 60 % 60, whole % 60
    return f"{h:02d}:{m:02d}:{s:02d}:{int(frame):02d}.{round((frame - int(frame)) * 1000) % 1000:03d}"


def live_link_csv(frames: np.ndarray, fps: float = FPS) -> bytes:
    rows = np.round(np.asarray(frames, dtype=np.float64)[:, _LIVE_LINK_ORDER], DECIMALS)
    zeros = ",".join("0" for _ in LIVE_LINK_ROTATIONS)
    count = len(LIVE_LINK_SHAPES) + len(LIVE_LINK_ROTATIONS)
    lines = [",".join(LIVE_LINK_COLUMNS)]
    for k, row in enumerate(rows):
        lines.append(f"{live_link_timecode(k / fps, fps)},{count}," + ",".join(repr(float(v)) for v in row) + "," + zeros)
    return ("\r\n".join(lines) + "\r\n").encode()


def ndjson(frames: np.ndarray, fps: float = FPS, **metadata: Any) -> bytes:
    rows = _rounded(frames)
    head = {"names": list(ARKIT_NAMES), "fps": float(fps), "frame_count": len(rows), "metadata": metadata}
    lines = [json.dumps(head, ensure_ascii=False)]
    lines += [json.dumps({"frame": k, "time": k / fps, "weights": row}) for k, row in enumerate(rows)]
    return ("\n".join(lines) + "\n").encode()


def _pad4(data: bytes, fill: bytes = b"\0") -> bytes:
    return data + fill * (-len(data) % 4)


def gltf_binary(frames: np.ndarray, fps: float = FPS) -> bytes:
    """A ``.glb``: one triangle with 52 (zero-offset) morph targets named in
    ``mesh.extras.targetNames`` (the convention three.js, Babylon.js and
    Blender read), and one animation sampling their weights at each frame
    (LINEAR). The triangle is a stand-in: the animation is what carries over."""
    frames = np.asarray(frames, dtype=np.float32)
    n, k = len(frames), len(ARKIT_NAMES)
    times = (np.arange(max(n, 1), dtype=np.float32) / np.float32(fps))
    weights = frames if n else np.zeros((1, k), np.float32)
    positions = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=np.float32)
    deltas = np.zeros((3, 3), dtype=np.float32)
    blobs = [positions.tobytes(), deltas.tobytes(), times.tobytes(), weights.astype(np.float32).tobytes()]
    views, offset = [], 0
    for blob in blobs:
        views.append({"buffer": 0, "byteOffset": offset, "byteLength": len(blob)})
        offset += len(blob)
    binary = _pad4(b"".join(blobs))
    doc = {
        "asset": {"version": "2.0", "generator": "lam-a2e-server"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"name": "face", "mesh": 0}],
        "meshes": [{
            "name": "arkit_face",
            "primitives": [{"attributes": {"POSITION": 0}, "targets": [{"POSITION": 1} for _ in range(k)]}],
            "weights": [0.0] * k,
            "extras": {"targetNames": list(ARKIT_NAMES)},
        }],  # fmt: skip
        "accessors": [
            {"bufferView": 0, "componentType": 5126, "count": 3, "type": "VEC3", "min": [0, 0, 0], "max": [1, 1, 0]},
            {"bufferView": 1, "componentType": 5126, "count": 3, "type": "VEC3", "min": [0, 0, 0], "max": [0, 0, 0]},
            {"bufferView": 2, "componentType": 5126, "count": len(times), "type": "SCALAR",
             "min": [float(times[0])], "max": [float(times[-1])]},
            {"bufferView": 3, "componentType": 5126, "count": len(times) * k, "type": "SCALAR"},
        ],  # fmt: skip
        "bufferViews": views,
        "buffers": [{"byteLength": len(binary)}],
        "animations": [{
            "name": "speech",
            "samplers": [{"input": 2, "output": 3, "interpolation": "LINEAR"}],
            "channels": [{"sampler": 0, "target": {"node": 0, "path": "weights"}}],
        }],  # fmt: skip
    }
    text = _pad4(json.dumps(doc, separators=(",", ":")).encode(), b" ")
    chunks = struct.pack("<II", len(text), 0x4E4F534A) + text + struct.pack("<II", len(binary), 0x004E4942) + binary
    return struct.pack("<III", 0x46546C67, 2, 12 + len(chunks)) + chunks
