"""``Client``: one method per endpoint, streaming of files or any iterator of
audio chunks, retries on 429/503 that honour Retry-After, and sessions that
are closed whatever happens.

    from a2e_client import Client
    c = Client("http://localhost:8000")
    result = c.animate("speech.wav", id_idx=1)            # the document's JSON
    csv = c.animate("speech.wav", format="csv")           # bytes: Live Link Face CSV
    for frame in c.stream_file("speech.wav", chunk_s=1):  # frames as chunks are answered
        print(frame["time"], frame["weights"][24])        # session time, jawOpen
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import requests

JSON_FORMATS = ("json", "json_named")


class ServerError(RuntimeError):
    """The server answered an error: its status and the reason it gave."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


def _audio_bytes(audio: str | Path | bytes | BinaryIO) -> tuple[str, bytes]:
    if isinstance(audio, (bytes, bytearray)):
        return "audio", bytes(audio)
    if isinstance(audio, (str, Path)):
        return Path(audio).name, Path(audio).read_bytes()
    return getattr(audio, "name", "audio"), audio.read()


class Client:
    def __init__(
        self,
        url: str = "http://localhost:8000",
        api_key: str | None = None,
        timeout_s: float = 120.0,
        retries: int = 5,
        max_retry_wait_s: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_retry_wait_s = max_retry_wait_s
        self.http = requests.Session()
        if api_key:
            self.http.headers["X-API-Key"] = api_key

    # -- plumbing -------------------------------------------------------------------
    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One request, again after Retry-After (or a short backoff) on 429 and 503."""
        for attempt in range(self.retries + 1):
            res = self.http.request(method, self.url + path, timeout=self.timeout_s, **kwargs)
            if res.status_code not in (429, 503) or attempt == self.retries:
                break
            wait = res.headers.get("Retry-After", "")
            time.sleep(min(self.max_retry_wait_s, float(wait) if wait.replace(".", "", 1).isdigit() else 0.5 * 2**attempt))
            for value in kwargs.get("files", {}).values():  # file objects are read again
                if hasattr(value[1], "seek"):
                    value[1].seek(0)
        if res.status_code >= 400:
            try:
                detail = res.json().get("detail", res.text)
            except ValueError:
                detail = res.text
            raise ServerError(res.status_code, str(detail))
        return res

    # -- the endpoints ----------------------------------------------------------------
    def info(self) -> dict:
        return self._call("GET", "/").json()

    def health(self) -> dict:
        return self._call("GET", "/api/health").json()

    def animate(
        self,
        audio: str | Path | bytes | BinaryIO,
        *,
        id_idx: int = 0,
        movement_smooth: bool = False,
        brow_movement: bool = False,
        ex_vol: bool = False,
        seed: int | None = None,
        loudness: str | None = None,
        format: str = "json",  # noqa: A002 - the API's field name
    ) -> dict | bytes:
        """``/api/infer``: the document's JSON (a dict), ``json_named`` (a dict),
        or the bytes of ``csv``, ``gltf`` or ``ndjson``."""
        name, data = _audio_bytes(audio)
        fields = {"id_idx": id_idx, "movement_smooth": movement_smooth, "brow_movement": brow_movement, "ex_vol": ex_vol,
                  "format": format}  # fmt: skip
        if seed is not None:
            fields["seed"] = seed
        if loudness is not None:
            fields["loudness"] = loudness
        res = self._call("POST", "/api/infer", files={"audio_file": (name, io.BytesIO(data))},
                         data={k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()})  # fmt: skip
        return res.json() if format in JSON_FORMATS else res.content

    def open_session(self, id_idx: int = 0, **options: Any) -> "Session":
        """``/api/infer_stream_init``; options: seed, context_mode, loudness, tuning."""
        body = {"id_idx": id_idx, **{k: v for k, v in options.items() if v is not None}}
        return Session(self, self._call("POST", "/api/infer_stream_init", json=body).json())

    def stream(
        self,
        chunks: Iterable[bytes],
        id_idx: int = 0,
        progress: Callable[[int, float], None] | None = None,
        pcm: bool = True,
        **options: Any,
    ) -> Iterator[dict]:
        """Send each chunk in order on one session and yield its frames, with
        session times. Chunks are 16 kHz mono s16le PCM (``pcm=False``: each
        is an audio file). The session is closed at the end, on an error, or
        when the caller stops iterating. ``progress(chunks_done, seconds)``."""
        with self.open_session(id_idx, **options) as session:
            for k, chunk in enumerate(chunks):
                answer = session.send(chunk, pcm=pcm)
                start = answer["metadata"].get("chunk_start_time", 0.0)
                for frame in answer["frames"]:
                    yield {"time": start + frame["time"], "weights": frame["weights"]}
                if progress is not None:
                    progress(k + 1, session.audio_seconds)

    def stream_file(self, path: str | Path, chunk_s: float = 1.0, **kwargs: Any) -> Iterator[dict]:
        """A file streamed as ``chunk_s`` chunks of 16 kHz s16le PCM (the last may be shorter)."""
        return self.stream(pcm_chunks(path, chunk_s), **kwargs)

    def stream_websocket(self, chunks: Iterable[bytes], sample_rate: int = 16000, hop: float | None = None,
                         **options: Any) -> Iterator[dict]:  # fmt: skip
        """The same over ``/api/stream`` (one connection; s16le mono PCM at
        ``sample_rate``): frames as the server sends them."""
        from websockets.sync.client import connect

        start = {"type": "start", "sample_rate": sample_rate, **{k: v for k, v in options.items() if v is not None}}
        if hop is not None:
            start["hop"] = hop
        headers = {"X-API-Key": self.http.headers["X-API-Key"]} if "X-API-Key" in self.http.headers else None
        with connect(self.url.replace("http", "ws", 1) + "/api/stream", additional_headers=headers,
                     open_timeout=self.timeout_s, max_size=None) as ws:  # fmt: skip
            ws.send(json.dumps(start))
            _check_ws(json.loads(ws.recv(self.timeout_s)))
            for chunk in chunks:
                ws.send(chunk)
            ws.send(json.dumps({"type": "end"}))
            while True:
                message = _check_ws(json.loads(ws.recv(self.timeout_s)))
                if message["type"] == "end":
                    return
                yield from ({"time": f["time"], "weights": f["weights"]} for f in message["frames"])


def _check_ws(message: dict) -> dict:
    if message.get("type") == "error":
        raise ServerError(message["status"], message["detail"])
    return message


class Session:
    """A streaming session; a context manager that closes it."""

    def __init__(self, client: Client, opened: dict) -> None:
        self.client = client
        self.id: str = opened["session_id"]
        self.opened = opened
        self.audio_seconds = 0.0
        self.closed = False

    def send(self, chunk: bytes, pcm: bool = False) -> dict:
        """``/api/infer_stream_chunk``: the chunk's answer (the document's JSON).
        ``pcm``: the chunk is 16 kHz mono s16le PCM (said so, not guessed)."""
        fields = {"session_id": self.id}
        if pcm:
            fields.update(sample_rate="16000", encoding="s16le", channels="1")
        res = self.client._call("POST", "/api/infer_stream_chunk", data=fields,
                                files={"audio_chunk": ("chunk", io.BytesIO(chunk))})  # fmt: skip
        answer = res.json()
        self.audio_seconds += answer["metadata"].get("audio_length", 0.0)
        return answer

    def close(self) -> dict | None:
        if self.closed:
            return None
        self.closed = True
        try:
            return self.client._call("DELETE", f"/api/infer_stream_close/{self.id}").json()
        except ServerError as exc:
            if exc.status == 404:  # expired or lost already: closed all the same
                return None
            raise

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pcm_chunks(path: str | Path, chunk_s: float = 1.0) -> Iterator[bytes]:
    """A sound file as 16 kHz mono s16le PCM chunks of ``chunk_s`` seconds."""
    import numpy as np
    import soundfile as sf
    import soxr

    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    mono = audio.mean(axis=1)
    if rate != 16000:
        mono = soxr.resample(mono, rate, 16000)
    pcm = (np.clip(mono, -1.0, 32767 / 32768) * 32768).astype("<i2")
    step = max(1, int(16000 * chunk_s))
    for at in range(0, len(pcm), step):
        yield pcm[at : at + step].tobytes()
