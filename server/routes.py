"""The API document's six endpoints, plus ``GET /metrics``.

Handlers validate, decode (through the front's threads), hand decoded audio
to the engine (in this process or an engine process) and serialise; nothing
else.
"""

from __future__ import annotations

import os
import time

from prometheus_client import CONTENT_TYPE_LATEST
from sanic import Blueprint
from sanic.request import Request
from sanic.response import HTTPResponse

from a2e import exports, raw_pcm, tuning
from a2e.loudness import LoudnessMode

from . import forms, metrics, responses
from .front import Front

bp = Blueprint("api")

SERVICE_NAME = "LAM-A2E API"
VERSION = "1.0.0"
# Above this many frames, encoding the JSON moves off the event loop.
_INLINE_ENCODE_FRAMES = 600


def _front(request: Request) -> Front:
    return request.app.ctx.front


def _require_model(front: Front) -> None:
    if not front.engine.ready:
        raise forms.RequestError(503, f"Model not loaded: {front.engine.not_ready_reason}")


_LOUDNESS = tuple(m.value for m in LoudnessMode)


def _loudness(value: object, front: Front) -> LoudnessMode:
    return LoudnessMode(forms.parse_str(value, "loudness", front.settings.loudness, _LOUDNESS))


def client_of(request: Request) -> str:
    """Whom ``--max-sessions-per-client`` counts this request against: its
    key's name with keys per client, else its address (from proxy headers
    when Sanic is configured to trust them, else the peer)."""
    caller = getattr(request.ctx, "caller", None)
    return caller.client if caller is not None else (request.remote_addr or request.ip or "unknown")


def _identity(front: Front, value: object) -> int:
    return forms.parse_int(value, "id_idx", 0, 0, front.engine.num_identities - 1)


def session_options(front: Front, body: dict) -> tuple[int, int | None, str, LoudnessMode]:
    """A new session's options (REST init body, WebSocket start message): identity, seed, context mode, loudness."""
    identity = _identity(front, body.get("id_idx"))
    seed = forms.parse_int(body.get("seed"), "seed", None, 0, 2**63 - 1)
    mode = forms.parse_str(body.get("context_mode"), "context_mode", front.settings.context_mode, ("continuous", "reference"))
    if mode == "reference" and body.get("loudness") not in (None, "", "off"):
        raise forms.RequestError(422, "the reference context mode reproduces the reference exactly: loudness must be off")
    return identity, seed, mode, _loudness(body.get("loudness"), front)


def tuning_options(body: dict) -> tuple[dict | None, tuple[str, ...]]:
    """A new session's ``tuning`` (a2e.tuning): the spec to hand the engine and
    what of it we cannot honour (told back to the client)."""
    spec = body.get("tuning")
    try:
        parsed = tuning.parse(spec)
    except tuning.TuningError as exc:
        raise forms.RequestError(422, str(exc)) from None
    return (spec if parsed.tuning is not None else None), parsed.ignored


async def _encode(front: Front, body: dict, frames: int) -> HTTPResponse:
    if frames <= _INLINE_ENCODE_FRAMES:
        return responses.json_response(body)
    return await front.run_io(responses.json_response, body)


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
                "stream": "/api/stream (WebSocket)",
                "health": "/api/health",
                "metrics": "/metrics",
                "demo": "/demo",
                "openapi": "/openapi.json",
                "docs": "/docs",
            },
        }
    )


@bp.get("/api/health")
async def health(request: Request) -> HTTPResponse:
    front = _front(request)
    s = front.settings
    stats = front.engine.stats(s.health_detail)
    limits = stats["limits"]
    body = {
        "status": "healthy" if stats["ready"] else "not_ready",
        "model_loaded": stats["ready"],
        "gpu_available": bool(stats.get("gpu_available")),
        "sessions": stats["sessions"],
        "model": stats["model"],
        "detail": stats["detail"],
        "queue_windows": stats["queue_windows"],
        "limits": {
            "max_sessions": s.max_sessions,
            "session_idle_timeout_s": s.session_idle_timeout_s,
            "max_upload_mb": s.max_upload_mb,
            "max_audio_s": limits["max_audio_s"],
            "max_chunk_s": limits["max_chunk_s"],
            "configured_max_audio_s": s.max_audio_s,
            "configured_max_chunk_s": s.max_chunk_s,
            "model_audio_s_per_s": limits["audio_s_per_s"],
            "response_timeout_s": s.response_timeout_s,
            "max_sessions_per_client": s.max_sessions_per_client,
            "max_batch": s.max_batch,
            "max_queue_windows": s.max_queue,
        },
        "default_context_mode": s.context_mode,
        "vocal_isolation": stats["vocal_isolation"],
        "draining": front.draining or stats["draining"],
        "loudness": {"default": s.loudness, "target_lufs": s.loudness_target_lufs},
        "grpc_port": s.grpc_port,  # Audio2Face-3D's gRPC API; 0: off
        # Where streaming sessions live: memory (this node's) or a shared store, and whether it answers.
        "state": stats.get("state") or {"store": "memory", "reachable": True},
    }
    state = body["state"]
    if state.get("store") != "memory" and state.get("sessions") is not None:
        body["sessions"] = state["sessions"]  # open in the whole cluster
    if "engines" in stats:
        body["engines"] = stats["engines"]
    if s.health_detail:
        body["worker_pid"] = os.getpid()
    return responses.json_response(body)


@bp.get("/api/ready")
async def ready(request: Request) -> HTTPResponse:
    """For load balancers and readiness probes (not in the API document): 200
    while this node takes work, 503 while its model loads or it drains. The
    session store is not part of it: a node without Redis still serves whole
    clips, and taking every node out would turn the store's 503s into none."""
    front = _front(request)
    if front.draining or front.engine.stats(False).get("draining"):
        return responses.error(503, "draining for shutdown", {"Retry-After": "1"})
    if not front.engine.ready:
        return responses.error(503, f"Model not loaded: {front.engine.not_ready_reason}", {"Retry-After": "5"})
    return responses.json_response({"status": "ready"})


def _export_format(request: Request) -> str:
    """``format`` as a form field or in the query (``/api/infer?format=csv``, what curl users try first)."""
    in_form, in_query = forms.form_field(request, "format"), request.args.get("format")
    if in_form and in_query and in_form.strip().lower() != in_query.strip().lower():
        raise forms.RequestError(400, f"format is given twice, differently: {in_form!r} in the form, {in_query!r} in the query")
    value = (in_form or in_query or "json").strip().lower()
    if value not in exports.FORMATS:
        raise forms.RequestError(400, f"unknown format {value!r}: the formats are {', '.join(exports.FORMATS)}")
    return value


def _raw_format(request: Request, field: str) -> raw_pcm.RawFormat | None:
    """Headerless PCM the client announces: form fields, else the part's Content-Type."""
    fmt = raw_pcm.from_fields(
        forms.parse_int(forms.form_field(request, "sample_rate"), "sample_rate", None, 1000, 384_000),
        forms.parse_str(forms.form_field(request, "encoding"), "encoding", None, tuple(raw_pcm.ENCODINGS)),
        forms.parse_int(forms.form_field(request, "channels"), "channels", None, 1, 32),
    )
    return fmt or raw_pcm.from_content_type(forms.file_type(request, field))


@bp.post("/api/infer")
async def infer(request: Request) -> HTTPResponse:
    started = time.perf_counter()
    front = _front(request)
    _require_model(front)
    identity = _identity(front, forms.form_field(request, "id_idx"))
    ex_vol = forms.parse_bool(forms.form_field(request, "ex_vol"), "ex_vol", False)
    movement_smooth = forms.parse_bool(forms.form_field(request, "movement_smooth"), "movement_smooth", False)
    brow = forms.parse_bool(forms.form_field(request, "brow_movement"), "brow_movement", False)
    seed = forms.parse_int(forms.form_field(request, "seed"), "seed", None, 0, 2**63 - 1)
    loudness = _loudness(forms.form_field(request, "loudness"), front)
    fmt = _export_format(request)
    data = forms.file_field(request, "audio_file")
    raw = _raw_format(request, "audio_file")
    # Holding a slot from decoding to the encoded answer bounds memory (see Front.clip_slot).
    async with front.clip_slot():
        front.check_accepting()
        audio, sample_rate = await front.decode_clip(data, ex_vol, raw)
        frames = await front.until_done(
            front.engine.infer_clip(
                audio,
                identity,
                movement_smooth=movement_smooth,
                brow_movement=brow,
                seed=seed,
                ex_vol=ex_vol,
                sample_rate=sample_rate,
                loudness=loudness,
            )
        )
        metadata = {
            "inference_time": time.perf_counter() - started,
            "audio_length": audio.shape[-1] / sample_rate,
            "id_idx": identity,
            "ex_vol": ex_vol,
            "loudness": loudness.value,
        }
        if fmt != "json":
            return await front.run_io(lambda: responses.export(frames, fmt, **metadata))
        return await _encode(front, responses.animation(frames, **metadata), len(frames))


@bp.post("/api/infer_stream_init")
async def stream_init(request: Request) -> HTTPResponse:
    front = _front(request)
    _require_model(front)
    body = forms.json_body(request)
    identity, seed, mode, loudness = session_options(front, body)
    spec, ignored = tuning_options(body)
    opened = await front.until_done(
        front.engine.open_session(identity, seed, mode, loudness, client_of(request), spec)
    )
    request.ctx.session_id = opened.session_id
    answer = {
        "session_id": opened.session_id,
        "message": "Streaming session initialized",
        "id_idx": identity,
        "context_mode": opened.context_mode,
        "seed": seed,
        "loudness": opened.loudness,
    }
    if "tuning" in body:
        answer["tuning_ignored"] = list(ignored)
    return responses.json_response(answer)


@bp.post("/api/infer_stream_chunk")
async def stream_chunk(request: Request) -> HTTPResponse:
    started = time.perf_counter()
    front = _front(request)
    _require_model(front)
    session_id = forms.form_field(request, "session_id")
    if not session_id:
        raise forms.RequestError(422, "missing form field 'session_id'")
    request.ctx.session_id = session_id
    # Optional: the chunk's number (from 1, as metadata.chunk_index): a retry is answered again, not applied twice.
    chunk_index = forms.parse_int(forms.form_field(request, "chunk_index"), "chunk_index", None, 1, 2**53)
    data = forms.file_field(request, "audio_chunk")
    raw = _raw_format(request, "audio_chunk")
    front.check_accepting()
    result = await front.stream_chunk(session_id, data, raw, chunk_index)
    latency = time.perf_counter() - started  # the whole chunk arrived with the request
    metrics.STREAM_ANSWERS.labels("rest").inc()
    if len(result.frames):
        metrics.FIRST_FRAME_LATENCY.labels("rest").observe(latency)
    body = responses.animation(
        result.frames,
        session_id=session_id,
        chunk_index=result.chunk_index,
        inference_time=time.perf_counter() - started,
        audio_length=result.audio_seconds,
        chunk_start_time=result.start_time,
        context_mode=result.context_mode,
    )
    return responses.json_response(body)


@bp.delete("/api/infer_stream_close/<session_id:str>")
async def stream_close(request: Request, session_id: str) -> HTTPResponse:
    request.ctx.session_id = session_id
    closed = await _front(request).engine.close_session(session_id)
    if closed is None:
        raise forms.RequestError(404, f"Session not found: {session_id}")
    if closed.frames and closed.seconds > 0:
        metrics.STREAM_FPS.labels("rest").observe(closed.frames / closed.seconds)
    return responses.json_response(
        {"message": "Session closed", "session_id": session_id, "chunks_processed": closed.chunks}
    )


@bp.get("/metrics")
async def prometheus_metrics(request: Request) -> HTTPResponse:
    return HTTPResponse(metrics.exposition(), content_type=CONTENT_TYPE_LATEST)
