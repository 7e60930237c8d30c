"""The API document's six endpoints, plus ``GET /metrics``.

Handlers validate, hand the work to the InferenceService (which runs it off
the event loop, through the batcher) and serialise; nothing else.
"""

from __future__ import annotations

import time

import torch
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sanic import Blueprint
from sanic.request import Request
from sanic.response import HTTPResponse

from a2e.loudness import LoudnessMode

from . import forms, responses
from .service import InferenceService

bp = Blueprint("api")

SERVICE_NAME = "LAM-A2E API"
VERSION = "1.0.0"
# Above this many frames, encoding the JSON moves off the event loop.
_INLINE_ENCODE_FRAMES = 600


def _service(request: Request) -> InferenceService:
    return request.app.ctx.service


def _require_model(service: InferenceService) -> None:
    if not service.ready:
        raise forms.RequestError(503, f"Model not loaded: {service.not_ready_reason}")


_LOUDNESS = tuple(m.value for m in LoudnessMode)


def _loudness(value: object, service: InferenceService) -> LoudnessMode:
    return LoudnessMode(forms.parse_str(value, "loudness", service.settings.loudness, _LOUDNESS))


def client_address(request: Request) -> str:
    """The client's address: from proxy headers when Sanic is configured to trust them, else the peer."""
    return request.remote_addr or request.ip or "unknown"


def _shown_path(path: str | None, detail: bool) -> str | None:
    """File names only in /api/health unless the operator asks for detail: absolute
    paths tell an attacker about the machine."""
    if path is None or detail:
        return path
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def _identity(service: InferenceService, value: object) -> int:
    return forms.parse_int(value, "id_idx", 0, 0, service.num_identities - 1)


async def _encode(service: InferenceService, body: dict, frames: int) -> HTTPResponse:
    if frames <= _INLINE_ENCODE_FRAMES:
        return responses.json_response(body)
    return await service.run_io(responses.json_response, body)


@bp.get("/")
async def root(request: Request) -> HTTPResponse:
    return responses.json_response(
        {
            "service": SERVICE_NAME,
            "version": VERSION,
            "endpoints": {
                "infer": "/api/infer",
                "stream_init": "/api/infer_stream_init",
                "stream_chunk": "/api/infer_stream_chunk",
                "stream_close": "/api/infer_stream_close/{session_id}",
                "health": "/api/health",
                "metrics": "/metrics",
            },
        }
    )


@bp.get("/api/health")
async def health(request: Request) -> HTTPResponse:
    service = _service(request)
    s = service.settings
    info = service.model_info
    separation = dict(service.separator.status)
    separation["model_dir"] = _shown_path(separation.get("model_dir"), s.health_detail)
    body = {
        "status": "healthy" if service.ready else "not_ready",
        "model_loaded": service.ready,
        "gpu_available": torch.cuda.is_available(),
        "sessions": len(service.sessions),
        "model": None
        if info is None
        else {
            "name": info.name,
            "weights": _shown_path(info.weights, s.health_detail),
            "device": info.device,
            "dtype": info.dtype,
            "runner": info.runner_mode,
            "num_identities": info.num_identities,
            "parameters": info.parameters,
        },
        "detail": None if service.ready else service.not_ready_reason,
        "queue_windows": service.batcher.queued_windows if service.batcher else 0,
        "limits": {
            "max_sessions": s.max_sessions,
            "session_idle_timeout_s": s.session_idle_timeout_s,
            "max_upload_mb": s.max_upload_mb,
            "max_audio_s": service.limits.max_audio_s,
            "max_chunk_s": service.limits.max_chunk_s,
            "configured_max_audio_s": s.max_audio_s,
            "configured_max_chunk_s": s.max_chunk_s,
            "model_audio_s_per_s": service.limits.audio_s_per_s,
            "response_timeout_s": s.response_timeout_s,
            "max_sessions_per_client": s.max_sessions_per_client,
            "max_batch": s.max_batch,
            "max_queue_windows": s.max_queue,
        },
        "default_context_mode": s.context_mode,
        "vocal_isolation": separation,
        "draining": service.draining,
        "loudness": {"default": s.loudness, "target_lufs": s.loudness_target_lufs},
    }
    return responses.json_response(body)


@bp.post("/api/infer")
async def infer(request: Request) -> HTTPResponse:
    started = time.perf_counter()
    service = _service(request)
    _require_model(service)
    identity = _identity(service, forms.form_field(request, "id_idx"))
    ex_vol = forms.parse_bool(forms.form_field(request, "ex_vol"), "ex_vol", False)
    movement_smooth = forms.parse_bool(forms.form_field(request, "movement_smooth"), "movement_smooth", False)
    brow = forms.parse_bool(forms.form_field(request, "brow_movement"), "brow_movement", False)
    seed = forms.parse_int(forms.form_field(request, "seed"), "seed", None, 0, 2**63 - 1)
    loudness = _loudness(forms.form_field(request, "loudness"), service)
    data = forms.file_field(request, "audio_file")
    # Holding a slot from decoding to the encoded answer bounds memory (see InferenceService.clip_slot).
    async with service.clip_slot():
        frames, seconds = await service.infer_clip(
            data,
            identity,
            movement_smooth=movement_smooth,
            brow_movement=brow,
            seed=seed,
            ex_vol=ex_vol,
            loudness=loudness,
        )
        body = responses.animation(
            frames,
            inference_time=time.perf_counter() - started,
            audio_length=seconds,
            id_idx=identity,
            ex_vol=ex_vol,
            loudness=loudness.value,
        )
        return await _encode(service, body, len(frames))


@bp.post("/api/infer_stream_init")
async def stream_init(request: Request) -> HTTPResponse:
    service = _service(request)
    _require_model(service)
    body = forms.json_body(request)
    identity = _identity(service, body.get("id_idx"))
    seed = forms.parse_int(body.get("seed"), "seed", None, 0, 2**63 - 1)
    mode = forms.parse_str(body.get("context_mode"), "context_mode", service.settings.context_mode, ("continuous", "reference"))
    if mode == "reference" and body.get("loudness") not in (None, "", "off"):
        raise forms.RequestError(422, "the reference context mode reproduces the reference exactly: loudness must be off")
    loudness = _loudness(body.get("loudness"), service)
    session = service.open_session(identity, seed, mode, loudness, client=client_address(request))
    return responses.json_response(
        {
            "session_id": session.id,
            "message": "Streaming session initialized",
            "id_idx": identity,
            "context_mode": mode,
            "seed": seed,
            "loudness": session.state.loudness_mode.value,
        }
    )


@bp.post("/api/infer_stream_chunk")
async def stream_chunk(request: Request) -> HTTPResponse:
    started = time.perf_counter()
    service = _service(request)
    _require_model(service)
    session_id = forms.form_field(request, "session_id")
    if not session_id:
        raise forms.RequestError(422, "missing form field 'session_id'")
    data = forms.file_field(request, "audio_chunk")
    session = service.sessions.get(session_id)
    if session is None:
        raise forms.RequestError(404, f"Session not found: {session_id} (unknown, closed or expired)")
    result = await service.stream_chunk(session, data)
    body = responses.animation(
        result.frames,
        session_id=session.id,
        chunk_index=result.chunk_index,
        inference_time=time.perf_counter() - started,
        audio_length=result.audio_seconds,
        chunk_start_time=result.start_time,
        context_mode=session.state.mode.value,
    )
    return responses.json_response(body)


@bp.delete("/api/infer_stream_close/<session_id:str>")
async def stream_close(request: Request, session_id: str) -> HTTPResponse:
    session = _service(request).close_session(session_id)
    if session is None:
        raise forms.RequestError(404, f"Session not found: {session_id}")
    return responses.json_response(
        {"message": "Session closed", "session_id": session_id, "chunks_processed": session.chunks_done}
    )


@bp.get("/metrics")
async def prometheus_metrics(request: Request) -> HTTPResponse:
    return HTTPResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
