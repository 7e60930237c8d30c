"""``GET /demo``: a page that shows what the server does (server/demo/):
audio in, a face, curves and a heat map out, whole files over
``/api/infer`` and live streams over ``/api/stream``. Static files of the
package, no build step and no third-party JavaScript, so it works offline.
"""

from __future__ import annotations

from pathlib import Path

from sanic import Blueprint
from sanic.request import Request
from sanic.response import HTTPResponse, file

from .forms import RequestError

DEMO_DIR = Path(__file__).resolve().parent / "demo"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".flac": "audio/flac"}  # fmt: skip
# What may be fetched: the page's own files and the shipped samples, by exact name.
_FILES = {p.relative_to(DEMO_DIR).as_posix(): p for p in DEMO_DIR.rglob("*") if p.suffix in _TYPES}

bp = Blueprint("demo")


@bp.get("/demo")
async def page(request: Request) -> HTTPResponse:
    return await file(_FILES["index.html"], mime_type=_TYPES[".html"], headers={"Cache-Control": "no-cache"})


@bp.get("/demo/<name:path>")
async def asset(request: Request, name: str) -> HTTPResponse:
    path = _FILES.get(name)
    if path is None:
        raise RequestError(404, f"no such demo file: {name}")
    return await file(path, mime_type=_TYPES[path.suffix], headers={"Cache-Control": "no-cache"})
