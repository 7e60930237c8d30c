"""The OpenAPI 3.1 description of the HTTP API (``GET /openapi.json``) and a
page that shows it (``GET /docs``, no third-party JavaScript). A test keeps
it in step with the routes; another validates it.

The WebSocket stream (``/api/stream``) and the Audio2Face-3D gRPC API have
no OpenAPI form: the description points at the README for them.
"""

from __future__ import annotations

from typing import Any

from sanic import Blueprint
from sanic.request import Request
from sanic.response import HTTPResponse, html

from a2e import exports
from a2e.constants import ARKIT_NAMES

from . import responses
from .routes import VERSION

bp = Blueprint("openapi")


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


_ERRORS = {
    "400": _error("the audio cannot be used (undecodable, empty, non-finite)"),
    "401": _error("missing or wrong API key (with --api-key)"),
    "413": _error("body or audio too long"),
    "422": _error("a field has the wrong type, is missing or out of range"),
    "429": _error("too many open sessions (Retry-After)"),
    "503": _error("model not loaded, queue full, or shutting down (Retry-After)"),
}


def _pick(*codes: str) -> dict:
    return {c: _ERRORS[c] for c in codes}


_AUDIO_FIELDS = {
    "sample_rate": {"type": "integer", "minimum": 1000, "maximum": 384000, "description": "headerless PCM only: its rate"},
    "encoding": {"type": "string", "enum": ["s16le", "s16be", "f32le"], "description": "headerless PCM only"},
    "channels": {"type": "integer", "minimum": 1, "maximum": 32, "description": "headerless PCM only"},
}

_SESSION_OPTIONS = {
    "id_idx": {"type": "integer", "minimum": 0, "default": 0, "description": "identity (style), 0 to the model's count - 1"},
    "seed": {"type": "integer", "minimum": 0, "description": "makes blinks (and brow movement) reproducible"},
    "context_mode": {"type": "string", "enum": ["continuous", "reference"], "description": "default: --context-mode"},
    "loudness": {"type": "string", "enum": ["off", "gates", "normalize"], "description": "default: --loudness"},
    "tuning": {"$ref": "#/components/schemas/Tuning"},
}


def spec() -> dict[str, Any]:
    json_of = lambda ref: {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}  # noqa: E731
    infer_content = json_of("Animation")
    for fmt, ctype in exports.FORMATS.items():
        if fmt != "json":
            infer_content.setdefault(ctype.split(";")[0], {"schema": {"type": "string", "description": f"format={fmt}"}})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "LAM-A2E API",
            "version": VERSION,
            "description": "Speech in, 52 ARKit blend-shape weights per frame out, at 30 fps. Also served: the "
            "WebSocket stream /api/stream and the Audio2Face-3D gRPC API (see the README); the demo page /demo.",
        },
        "paths": {
            "/": {"get": {"summary": "Service name, version and endpoints", "operationId": "root",
                          "responses": {"200": {"description": "the service", "content": json_of("Root")}}}},
            "/api/health": {"get": {"summary": "Model, sessions, limits and engines", "operationId": "health",
                                    "responses": {"200": {"description": "health", "content": json_of("Health")}}}},
            "/api/ready": {"get": {"summary": "200 while this node takes work; 503 while its model loads or it drains (for balancers)",
                                   "operationId": "ready",
                                   "responses": {"200": {"description": "ready"}, "503": {"description": "not ready", "content": json_of("Error")}}}},
            "/api/infer": {"post": {
                "summary": "Animate a whole audio file",
                "operationId": "infer",
                "parameters": [{"name": "format", "in": "query", "required": False,
                                "schema": {"type": "string", "enum": list(exports.FORMATS)},
                                "description": "the form's format field, given in the query instead"}],
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                    "type": "object", "required": ["audio_file"],
                    "properties": {
                        "audio_file": {"type": "string", "format": "binary", "description": "WAV, FLAC, OGG/Opus, MP3, or headerless 16 kHz s16le PCM"},
                        "id_idx": _SESSION_OPTIONS["id_idx"],
                        "ex_vol": {"type": "boolean", "default": False, "description": "isolate the voice first (Demucs)"},
                        "movement_smooth": {"type": "boolean", "default": False},
                        "brow_movement": {"type": "boolean", "default": False},
                        "seed": _SESSION_OPTIONS["seed"],
                        "loudness": _SESSION_OPTIONS["loudness"],
                        "format": {"type": "string", "enum": list(exports.FORMATS), "default": "json",
                                   "description": "json (the document's), json_named, csv (Live Link Face), gltf (.glb), ndjson"},
                        **_AUDIO_FIELDS,
                    }}}}},
                "responses": {"200": {"description": "the animation", "content": infer_content},
                              **_pick("400", "401", "413", "422", "503")},
            }},  # fmt: skip
            "/api/infer_stream_init": {"post": {
                "summary": "Open a streaming session",
                "operationId": "streamInit",
                "requestBody": {"required": False, "content": json_of("StreamInit")},
                "responses": {"200": {"description": "the session", "content": json_of("StreamInitAnswer")},
                              **_pick("401", "422", "429", "503")},
            }},
            "/api/infer_stream_chunk": {"post": {
                "summary": "Animate the next chunk of a session",
                "operationId": "streamChunk",
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                    "type": "object", "required": ["session_id", "audio_chunk"],
                    "properties": {
                        "session_id": {"type": "string", "format": "uuid"},
                        "audio_chunk": {"type": "string", "format": "binary"},
                        "chunk_index": {"type": "integer", "minimum": 1, "description": "this chunk's number (from 1): a retry of the last one is answered again, not applied twice; another number but the next is 409"},
                        **_AUDIO_FIELDS,
                    }}}}},
                "responses": {"200": {"description": "the chunk's frames", "content": json_of("Animation")},
                              "404": _error("no such session (closed, expired, or lost with its engine)"),
                              **_pick("400", "401", "413", "422", "503")},
            }},  # fmt: skip
            "/api/infer_stream_close/{session_id}": {"delete": {
                "summary": "Close a session",
                "operationId": "streamClose",
                "parameters": [{"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "closed", "content": json_of("StreamClosed")},
                              "404": _error("no such session"), **_pick("401")},
            }},
            "/metrics": {"get": {"summary": "Prometheus metrics", "operationId": "metrics",
                                 "responses": {"200": {"description": "text exposition format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This description", "operationId": "openapi",
                                      "responses": {"200": {"description": "OpenAPI 3.1",
                                                            "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/docs": {"get": {"summary": "This description as a page", "operationId": "docs",
                              "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
            "/demo": {"get": {"summary": "The demo page", "operationId": "demo",
                              "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        },  # fmt: skip
        "components": {"schemas": _schemas()},
    }


def _schemas() -> dict[str, Any]:
    number_map = {"type": "object", "additionalProperties": {"type": "number"}}
    return {
        "Error": {"type": "object", "required": ["detail"], "properties": {"detail": {"type": "string"}}},
        "Frame": {"type": "object", "required": ["weights", "time"], "properties": {
            "weights": {"type": "array", "items": {"type": "number"}, "minItems": 52, "maxItems": 52},
            "time": {"type": "number", "description": "seconds from the first frame of this answer"},
            "rotation": {"type": "array", "items": {"type": "number"}},
        }},  # fmt: skip
        "Animation": {"type": "object", "required": ["names", "metadata", "frames"], "properties": {
            "names": {"type": "array", "items": {"type": "string", "enum": list(ARKIT_NAMES)}, "minItems": 52, "maxItems": 52},
            "metadata": {"type": "object", "required": ["fps", "frame_count", "blendshape_count"], "properties": {
                "fps": {"type": "number"}, "frame_count": {"type": "integer"}, "blendshape_count": {"type": "integer"},
                "inference_time": {"type": "number"}, "audio_length": {"type": "number"}, "id_idx": {"type": "integer"},
                "session_id": {"type": "string"}, "chunk_index": {"type": "integer"},
                "chunk_start_time": {"type": "number", "description": "session time of this chunk's first frame"},
                "context_mode": {"type": "string"},
            }},
            "frames": {"type": "array", "items": {"$ref": "#/components/schemas/Frame"}},
        }},  # fmt: skip
        "Tuning": {"type": "object", "description": "per-session output tuning (README: Tuning)", "properties": {
            "face_params": number_map, "multipliers": number_map, "offsets": number_map, "clamp": {"type": "boolean"},
        }, "additionalProperties": False},  # fmt: skip
        "StreamInit": {"type": "object", "properties": _SESSION_OPTIONS},
        "StreamInitAnswer": {"type": "object", "required": ["session_id", "message", "id_idx"], "properties": {
            "session_id": {"type": "string"}, "message": {"type": "string"}, "id_idx": {"type": "integer"},
            "context_mode": {"type": "string"}, "seed": {"type": ["integer", "null"]}, "loudness": {"type": "string"},
            "tuning_ignored": {"type": "array", "items": {"type": "string"}},
        }},  # fmt: skip
        "StreamClosed": {"type": "object", "required": ["message", "session_id"], "properties": {
            "message": {"type": "string"}, "session_id": {"type": "string"}, "chunks_processed": {"type": "integer"},
        }},  # fmt: skip
        "Root": {"type": "object", "properties": {
            "service": {"type": "string"}, "version": {"type": "string"}, "endpoints": {"type": "object"}}},
        "Health": {"type": "object", "required": ["status", "model_loaded"], "properties": {
            "status": {"type": "string", "enum": ["healthy", "not_ready"]}, "model_loaded": {"type": "boolean"},
            "gpu_available": {"type": "boolean"}, "sessions": {"type": "integer"}, "model": {"type": "object"},
            "limits": {"type": "object"}, "engines": {"type": "array", "items": {"type": "object"}},
            "grpc_port": {"type": "integer", "description": "port of the Audio2Face-3D gRPC API (0: off)"},
        }},  # fmt: skip
    }


_SPEC = spec()

_DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>LAM-A2E API</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 1rem auto; padding: 0 1rem; color: #212529; }
.op { border: 1px solid #dee2e6; border-radius: 6px; margin: 0.8rem 0; padding: 0.5rem 0.8rem; }
.method { font-weight: bold; text-transform: uppercase; margin-right: 0.5rem; color: #1971c2; }
code, pre { font-family: ui-monospace, monospace; font-size: 0.85rem; }
pre { background: #f1f3f5; padding: 0.5rem; overflow-x: auto; }
td, th { text-align: left; padding: 0.15rem 0.6rem 0.15rem 0; vertical-align: top; }
</style></head>
<body><h1 id="title">LAM-A2E API</h1><p id="description"></p>
<p><a href="/openapi.json">openapi.json</a> &middot; <a href="/demo">demo page</a></p>
<div id="ops"></div>
<script>
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
fetch("/openapi.json").then((r) => r.json()).then((api) => {
  document.getElementById("title").textContent = `${api.info.title} ${api.info.version}`;
  document.getElementById("description").textContent = api.info.description;
  const out = [];
  for (const [path, ops] of Object.entries(api.paths)) for (const [method, op] of Object.entries(ops)) {
    const body = op.requestBody ? Object.entries(op.requestBody.content).map(([type, c]) => {
      const s = c.schema.$ref ? api.components.schemas[c.schema.$ref.split("/").pop()] : c.schema;
      const rows = Object.entries(s.properties || {}).map(([name, p]) =>
        `<tr><td><code>${esc(name)}</code>${(s.required || []).includes(name) ? " *" : ""}</td>` +
        `<td>${esc(p.type || (p.$ref || "").split("/").pop())}${p.enum ? " (" + esc(p.enum.join(", ")) + ")" : ""}` +
        `${p.default !== undefined ? " = " + esc(p.default) : ""}</td><td>${esc(p.description || "")}</td></tr>`).join("");
      return `<p>${esc(type)}</p><table>${rows}</table>`;
    }).join("") : "";
    const answers = Object.entries(op.responses).map(([code, r]) => `<tr><td>${code}</td><td>${esc(r.description)}</td></tr>`).join("");
    out.push(`<div class="op"><span class="method">${method}</span><code>${esc(path)}</code> ${esc(op.summary || "")}` +
      `${body}<table>${answers}</table></div>`);
  }
  out.push(`<h2>Schemas</h2><pre>${esc(JSON.stringify(api.components.schemas, null, 2))}</pre>`);
  document.getElementById("ops").innerHTML = out.join("");
});
</script></body></html>
"""


@bp.get("/openapi.json")
async def openapi_json(request: Request) -> HTTPResponse:
    return responses.json_response(_SPEC)


@bp.get("/docs")
async def docs(request: Request) -> HTTPResponse:
    return html(_DOCS_PAGE)
