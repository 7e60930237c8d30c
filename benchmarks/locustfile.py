"""Locust load test for streaming and whole-clip traffic.

    pip install -e '.[bench]'
    locust -f benchmarks/locustfile.py --host http://127.0.0.1:8000 --headless -u 20 -r 5 -t 60s

Run locust in its own process (it patches ssl on import), never inside the
server. All simulated users share one address: start the server with
``--max-sessions-per-client`` above the user count. A StreamingUser opens a session, sends 1 s chunks paced in real time
and closes it; a WebSocketUser streams 20 ms packets over ``/api/stream`` in
real time (each ``frames`` answer is reported with its first frame's latency
from the packet that completed it); a ClipUser posts whole clips now and then.

Against a cluster (nodes sharing ``--state redis://...`` behind a balancer),
run it distributed: users hold no state of their own, and every chunk
carries its ``chunk_index`` and ``X-Session-Id`` as our client sends them:

    locust -f benchmarks/locustfile.py --master --host http://BALANCER:8000 --headless -u 400 -r 20 -t 5m --expect-workers 4
    locust -f benchmarks/locustfile.py --worker --master-host MASTER   # on each load machine, one per core
"""

from __future__ import annotations

import io
import random
import time

import numpy as np
import soundfile as sf
from locust import HttpUser, User, between, task


def _wav(seconds: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    x = 0.25 * np.sin(2 * np.pi * 160 * t) * (np.sin(2 * np.pi * 1.2 * t) > -0.2) + 0.03 * rng.standard_normal(len(t))
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


CHUNKS = [_wav(1.0, i) for i in range(8)]
CLIPS = [_wav(s, 100 + i) for i, s in enumerate((3.0, 8.0, 15.0))]


class StreamingUser(HttpUser):
    weight = 9
    wait_time = between(0.5, 2.0)

    @task
    def stream(self) -> None:
        res = self.client.post("/api/infer_stream_init", json={"id_idx": random.randrange(12)})
        if res.status_code != 200:
            return
        sid = res.json()["session_id"]
        start = time.perf_counter()
        for k in range(10):
            due = start + k
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self.client.post(
                "/api/infer_stream_chunk",
                data={"session_id": sid, "chunk_index": str(k + 1)},
                files={"audio_chunk": ("chunk.wav", CHUNKS[k % len(CHUNKS)], "audio/wav")},
                headers={"X-Session-Id": sid},
                name="/api/infer_stream_chunk",
            )
        self.client.delete(f"/api/infer_stream_close/{sid}", headers={"X-Session-Id": sid}, name="/api/infer_stream_close/[id]")


PCM = [(np.frombuffer(c[44:], dtype="<i2")) for c in CHUNKS]  # the chunks' samples, as raw 16-bit PCM


class WebSocketUser(User):
    weight = 3
    wait_time = between(0.5, 2.0)

    @task
    def stream(self) -> None:
        import json

        from websockets.sync.client import connect

        url = self.host.replace("http://", "ws://").replace("https://", "wss://") + "/api/stream"
        pcm = np.concatenate(PCM)  # 8 s
        fire = self.environment.events.request.fire
        with connect(url) as ws:
            ws.send(json.dumps({"type": "start", "id_idx": random.randrange(12)}))
            json.loads(ws.recv(10))
            start = time.perf_counter()
            sent_at = []
            for k, i in enumerate(range(0, len(pcm), 320)):  # 20 ms packets in real time
                delay = start + k * 0.02 - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                ws.send(pcm[i : i + 320].tobytes())
                sent_at.append(time.perf_counter())
                while True:  # answers that arrived meanwhile
                    try:
                        message = json.loads(ws.recv(0))
                    except TimeoutError:
                        break
                    self._report(fire, message, sent_at)
            ws.send(json.dumps({"type": "end"}))
            while (message := json.loads(ws.recv(30)))["type"] != "end":
                self._report(fire, message, sent_at)

    @staticmethod
    def _report(fire, message: dict, sent_at: list[float]) -> None:
        if message["type"] == "error":
            fire(request_type="WS", name="/api/stream", response_time=0, response_length=0,
                 exception=RuntimeError(message["detail"]))  # fmt: skip
            return
        packet = min(-(-(message["first_frame"] * 16000 // 30 + 1) // 320) - 1, len(sent_at) - 1)
        latency_ms = (time.perf_counter() - sent_at[packet]) * 1000
        fire(request_type="WS", name="/api/stream frames", response_time=latency_ms,
             response_length=len(message["frames"]), exception=None)  # fmt: skip


class ClipUser(HttpUser):
    weight = 1
    wait_time = between(2.0, 5.0)

    @task
    def clip(self) -> None:
        self.client.post(
            "/api/infer",
            files={"audio_file": ("clip.wav", random.choice(CLIPS), "audio/wav")},
            data={"movement_smooth": "true", "brow_movement": "true"},
        )
