"""A local stand-in for the Hugging Face Hub (``HF_ENDPOINT``): the part of
its HTTP protocol that ``huggingface_hub`` downloads a file with.

``HEAD``/``GET /{owner}/{repo}/resolve/{revision}/{file}`` answer with the
commit (``X-Repo-Commit``), the file's SHA-256 as its ETag (as the hub does
for large files), its length, and byte ranges for resumed downloads; an
unknown repository, revision or file gets the hub's 404 with its
``X-Error-Code``. Every request is recorded, so a test can tell a download
from a metadata look-up. ``stall_first_get_after`` holds the first download
after that many bytes until ``release`` is set (a test kills the client
meanwhile); ``tampered`` serves other bytes under a file's announced checksum.
"""

from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_PATH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


class StandInHub:
    def __init__(self, repos: dict[str, dict[str, bytes]], commit: str = COMMIT) -> None:
        self.repos = repos
        self.commit = commit
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.stall_first_get_after: int | None = None
        self.release = threading.Event()
        self.tampered: dict[str, bytes] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def gets(self) -> list[str]:
        return [path for method, path, _ in self.requests if method == "GET"]

    def __enter__(self) -> "StandInHub":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _fail(self, code: str) -> None:
                self.send_response(404)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", code)
                if code == "EntryNotFound":
                    self.send_header("X-Repo-Commit", hub.commit)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _answer(self, body: bool) -> None:
                hub.requests.append((self.command, self.path, self.headers.get("Range")))
                m = _PATH.match(self.path)
                if m is None or m["repo"] not in hub.repos:
                    return self._fail("RepoNotFound")
                if m["rev"] not in ("main", hub.commit):
                    return self._fail("RevisionNotFound")
                files = hub.repos[m["repo"]]
                if m["file"] not in files:
                    return self._fail("EntryNotFound")
                data = files[m["file"]]
                etag = hashlib.sha256(data).hexdigest()
                served = hub.tampered.get(m["file"], data)
                start = 0
                rng = self.headers.get("Range")
                if rng and (r := re.match(r"bytes=(\d+)-", rng)):
                    start = int(r[1])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", hub.commit)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(served) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(served) - 1}/{len(served)}")
                self.end_headers()
                if not body:
                    return
                payload = served[start:]
                if hub.stall_first_get_after is not None:
                    cut, hub.stall_first_get_after = hub.stall_first_get_after, None
                    self.wfile.write(payload[:cut])
                    self.wfile.flush()
                    hub.release.wait(60)
                    self.close_connection = True
                    return
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        return Handler
