"""Serialising animation to the API document's JSON (encoded with ujson)."""

from __future__ import annotations

from typing import Any

import numpy as np
import ujson
from sanic.response import HTTPResponse

from a2e import exports
from a2e.constants import ARKIT_NAMES, FPS, NUM_BLENDSHAPES, WEIGHT_DECIMALS

NAMES = list(ARKIT_NAMES)
DECIMALS = WEIGHT_DECIMALS


def animation(frames: np.ndarray, **metadata: Any) -> dict[str, Any]:
    """``{"names", "metadata", "frames": [{"weights", "time", "rotation"}]}``; ``time``
    counts from the first frame given (chunk-relative for streaming)."""
    weights = np.round(np.asarray(frames, dtype=np.float64), DECIMALS).tolist()
    return {
        "names": NAMES,
        "metadata": {"fps": float(FPS), "frame_count": len(weights), "blendshape_count": NUM_BLENDSHAPES, **metadata},
        "frames": [{"weights": w, "time": i / FPS, "rotation": []} for i, w in enumerate(weights)],
    }


def stream_frames(frames: np.ndarray, first_frame: int) -> dict[str, Any]:
    """A WebSocket ``frames`` message: session-absolute frame indices and times."""
    weights = np.round(np.asarray(frames, dtype=np.float64), DECIMALS).tolist()
    return {
        "type": "frames",
        "first_frame": first_frame,
        "start_time": first_frame / FPS,
        "frames": [{"weights": w, "time": (first_frame + i) / FPS} for i, w in enumerate(weights)],
    }


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> HTTPResponse:
    return HTTPResponse(
        ujson.dumps(body, ensure_ascii=False), status=status, headers=headers, content_type="application/json"
    )


def error(status: int, detail: str, headers: dict[str, str] | None = None) -> HTTPResponse:
    return json_response({"detail": detail}, status=status, headers=headers)


def export(frames: np.ndarray, fmt: str, **metadata: Any) -> HTTPResponse:
    """``frames`` in one of ``a2e.exports.FORMATS`` other than the document's JSON, as a download."""
    if fmt == "json_named":
        body = exports.json_named(frames, **metadata)
    elif fmt == "csv":
        body = exports.live_link_csv(frames)
    elif fmt == "gltf":
        body = exports.gltf_binary(frames)
    elif fmt == "ndjson":
        body = exports.ndjson(frames, **metadata)
    else:
        raise ValueError(f"unknown export format {fmt!r}")
    disposition = f'attachment; filename="animation.{exports.EXTENSIONS[fmt]}"'
    return HTTPResponse(body, content_type=exports.FORMATS[fmt], headers={"Content-Disposition": disposition})
