"""``Client``: one method per endpoint, streaming of files or any iterator of
audio chunks, retries on 429/503 that honour Retry-After and on broken
connections, and sessions that are closed whatever happens.

Retries never double a chunk: each is sent with its ``chunk_index``, so a
chunk whose answer was lost (its node died) is answered again, not applied
twice; and a session's requests carry ``X-Session-Id``, which a balancer can
hash on to keep them on one node. A WebSocket stream whose connection breaks
resumes on a new one (with a shared state store on the server).

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
import logging
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import requests

from .replay import SentChunks

JSON_FORMATS = ("json", "json_named")
log = logging.getLogger("a2e_client")


class ServerError(RuntimeError):
    """The server answered an error: its status and the reason it gave."""

    def __init__(self, status: int, detail: str, expected_chunk_index: int | None = None) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.expected_chunk_index = expected_chunk_index  # a 409's X-Expected-Chunk-Index


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
        ca_cert: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
        replay_s: float = 10.0,
    ) -> None:
        """``https://`` URLs are verified against the system's CAs, or
        ``ca_cert`` (a PEM file) for a private CA; ``client_cert`` and
        ``client_key`` (PEM) answer a server that asks for mutual TLS.
        Streaming sessions keep the last ``replay_s`` seconds of the audio
        they sent, to send again where the server's store lost it."""
        self.replay_s = replay_s
        if (client_cert is None) != (client_key is None):
            raise ValueError("a client certificate needs both client_cert and client_key")
        self.url = url.rstrip("/")
        self.ca_cert = str(ca_cert) if ca_cert else None
        self.client_cert = (str(client_cert), str(client_key)) if client_cert else None
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_retry_wait_s = max_retry_wait_s
        self.http = requests.Session()
        if self.ca_cert:
            self.http.verify = self.ca_cert
        if self.client_cert:
            self.http.cert = self.client_cert
        if api_key:
            self.http.headers["X-API-Key"] = api_key

    # -- plumbing -------------------------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext:
        """The WebSocket's TLS settings, the same as the HTTP requests'."""
        context = ssl.create_default_context(cafile=self.ca_cert)
        if self.client_cert:
            context.load_cert_chain(*self.client_cert)
        return context

    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One request, again after Retry-After (or a short backoff) on 429,
        502, 503 and 504, and after a broken connection or a timeout (every request this
        client makes may be sent twice: chunks carry their number)."""
        for attempt in range(self.retries + 1):
            try:
                # verify per request: requests lets REQUESTS_CA_BUNDLE override a session's own CA
                res = self.http.request(method, self.url + path, timeout=self.timeout_s, verify=self.http.verify, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt == self.retries:
                    raise
                log.info("%s %s: %s; retrying", method, path, type(exc).__name__)
                wait = ""
            else:
                # 502/504: a balancer whose node died under the request.
                if res.status_code not in (429, 502, 503, 504) or attempt == self.retries:
                    break
                wait = res.headers.get("Retry-After", "")
            time.sleep(min(self.max_retry_wait_s, float(wait) if wait.replace(".", "", 1).isdigit() else 0.25 * 2**attempt))
            for value in kwargs.get("files", {}).values():  # file objects are read again
                if hasattr(value[1], "seek"):
                    value[1].seek(0)
        if res.status_code >= 400:
            try:
                detail = res.json().get("detail", res.text)
            except ValueError:
                detail = res.text
            expected = res.headers.get("X-Expected-Chunk-Index", "")
            raise ServerError(res.status_code, str(detail), int(expected) if expected.isdigit() else None)
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
                         resumes: int = 3, **options: Any) -> Iterator[dict]:  # fmt: skip
        """The same over ``/api/stream`` (one connection; s16le mono PCM at
        ``sample_rate``): frames as the server sends them. A connection that
        breaks is resumed on a new one up to ``resumes`` times (the server
        needs a shared state store): the audio is sent again from where the
        session stands, and no frame is given twice or skipped."""
        from websockets.exceptions import ConnectionClosed, InvalidHandshake
        from websockets.sync.client import connect

        start = {"type": "start", "sample_rate": sample_rate, **{k: v for k, v in options.items() if v is not None}}
        if hop is not None:
            start["hop"] = hop
        headers = {"X-API-Key": self.http.headers["X-API-Key"]} if "X-API-Key" in self.http.headers else None
        url = self.url.replace("http", "ws", 1) + "/api/stream"
        pending = iter(chunks)
        sent = bytearray()  # the audio so far, sent again from where a resumed session stands
        session_id, attempt = None, 0
        received = [0]  # frames given to the caller

        def frames_in(text: str | bytes) -> list[dict]:
            message = _check_ws(json.loads(text))
            if message["type"] != "frames":
                return []
            fresh = []
            for i, f in enumerate(message["frames"]):
                if message["first_frame"] + i == received[0]:  # a frame sent again is skipped
                    received[0] += 1
                    fresh.append({"time": f["time"], "weights": f["weights"]})
            return fresh

        while True:
            try:
                with connect(url, additional_headers=headers, open_timeout=self.timeout_s, max_size=None,
                             ssl=self._ssl_context() if url.startswith("wss:") else None) as ws:  # fmt: skip
                    if session_id is None:
                        ws.send(json.dumps(start))
                        session_id = _check_ws(json.loads(ws.recv(self.timeout_s)))["session_id"]
                    else:
                        ws.send(json.dumps({**start, "type": "resume", "session_id": session_id,
                                            "frames_received": received[0]}))  # fmt: skip
                        resumed = _check_ws(json.loads(ws.recv(self.timeout_s)))
                        at = resumed["audio_samples"] * sample_rate // 16000 * 2
                        if at < len(sent):
                            ws.send(bytes(sent[at:]))
                    for chunk in pending:
                        sent += chunk
                        ws.send(chunk)
                        # Frames as they come (what a broken connection loses is then only what was in flight).
                        while True:
                            try:
                                text = ws.recv(0)
                            except TimeoutError:
                                break
                            yield from frames_in(text)
                    ws.send(json.dumps({"type": "end"}))
                    while True:
                        text = ws.recv(self.timeout_s)
                        if json.loads(text).get("type") == "end":
                            return
                        yield from frames_in(text)
            except (ConnectionClosed, InvalidHandshake, OSError) as exc:
                if session_id is None or attempt >= resumes or isinstance(exc, ConnectionClosed) and _told(exc):
                    raise
                attempt += 1
                log.info("stream %s broke (%s); resuming from frame %d", session_id, type(exc).__name__, received[0])
                time.sleep(min(self.max_retry_wait_s, 0.25 * 2**attempt))


def _told(exc: Exception) -> bool:
    """A close the server chose (policy, overload): not a broken connection to resume."""
    rcvd = getattr(exc, "rcvd", None)
    return rcvd is not None and rcvd.code in (1000, 1008, 1011)


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
        self.chunks_sent = 0
        self.closed = False
        self.sent = SentChunks(client.replay_s)
        self.replayed = 0  # chunks sent again after the server's store lost them

    def send(self, chunk: bytes, pcm: bool = False) -> dict:
        """``/api/infer_stream_chunk``: the chunk's answer (the document's JSON).
        ``pcm``: the chunk is 16 kHz mono s16le PCM (said so, not guessed).
        Sent with its ``chunk_index``: retried, it is answered again, not
        applied twice. Where the server's store lost the session's last
        chunks (409 naming an earlier chunk), those are sent again from what
        this session kept, each checked against the answer it got before,
        and then this one."""
        index = self.chunks_sent + 1
        for attempt in range(4):
            try:
                answer = self._post(index, chunk, pcm)
                break
            except ServerError as exc:
                expected = exc.expected_chunk_index
                if exc.status != 409 or expected is None or expected >= index or attempt == 3:
                    raise
                self._replay(expected)
        self.chunks_sent += 1
        self.audio_seconds += answer["metadata"].get("audio_length", 0.0)
        self.sent.add(index, chunk, pcm, answer)
        return answer

    def _post(self, index: int, chunk: bytes, pcm: bool) -> dict:
        fields = {"session_id": self.id, "chunk_index": str(index)}
        if pcm:
            fields.update(sample_rate="16000", encoding="s16le", channels="1")
        res = self.client._call("POST", "/api/infer_stream_chunk", data=fields, headers={"X-Session-Id": self.id},
                                files={"audio_chunk": ("chunk", io.BytesIO(chunk))})  # fmt: skip
        return res.json()

    def _replay(self, expected: int) -> None:
        """Send the kept chunks from ``expected`` on again (from an earlier one
        if the store lost more meanwhile), checking each answer."""
        log.warning("session %s: the server's store lost chunks from %d on; sending them again", self.id, expected)
        todo = self.sent.since(expected)
        while todo:
            item = todo[0]
            try:
                answer = self._post(item.index, item.audio, item.pcm)
            except ServerError as exc:
                if exc.status == 409 and exc.expected_chunk_index is not None and exc.expected_chunk_index < item.index:
                    todo = self.sent.since(exc.expected_chunk_index)
                    continue
                raise
            SentChunks.check(item, answer)
            self.replayed += 1
            todo.pop(0)

    def close(self) -> dict | None:
        if self.closed:
            return None
        self.closed = True
        try:
            return self.client._call("DELETE", f"/api/infer_stream_close/{self.id}", headers={"X-Session-Id": self.id}).json()
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
