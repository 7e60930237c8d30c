"""CPU cost of serving a streaming chunk, outside the model.

    python benchmarks/serving_overhead.py

Two measurements, both with the model replaced by a stub that returns at once:

1. Per stage, in-process: multipart parsing, decoding, resampling (16 kHz and
   44.1 kHz input), volume, post-processing, JSON encoding, for a 1 s chunk.
2. Whole requests through the real server (HTTP, Sanic, batcher, sessions):
   server-process CPU seconds per chunk, from /proc, while a client sends
   chunks from many sessions.

At 2,000 chunks/s (one H100's target) the per-chunk figure says whether one
Python process can feed the GPU. Writes benchmarks/out/serving_overhead.json.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from a2e import audio, postprocess, streaming  # noqa: E402
from a2e.constants import WINDOW_FRAMES  # noqa: E402
from benchmarks.common import BOUNDARY, Connection, machine, multipart, save, speech_chunks  # noqa: E402
from batching.stub import StubRunner  # noqa: E402
from server import responses  # noqa: E402


def per_call(fn, n=300) -> float:
    fn()
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n


def stage_costs() -> dict:
    from sanic.request import parse_multipart_form

    chunk16 = speech_chunks(1)[0]
    buf = io.BytesIO()
    x44 = audio.resample(audio.load(chunk16), 16000, 44100)
    sf.write(buf, x44, 44100, format="WAV", subtype="PCM_16")
    chunk44 = buf.getvalue()
    body = multipart("0" * 36, chunk16)
    a16 = audio.load(chunk16)
    state = streaming.StreamState(identity=0, rng=np.random.default_rng(0))
    plans = streaming.plan_chunk(state, a16)
    raw = np.random.default_rng(0).random((WINDOW_FRAMES, 52)).astype(np.float32)
    prev = np.random.default_rng(1).random((64, 52)).astype(np.float32)
    pvol = np.full(64, 0.05, dtype=np.float32)
    frames = raw[34:]

    def finish():
        postprocess.postprocess_chunk(prev, pvol, frames, plans[0].volume, np.random.default_rng(0))

    costs = {
        "multipart_parse": per_call(lambda: parse_multipart_form(body, BOUNDARY.encode())),
        "decode_wav_16k": per_call(lambda: audio.decode(chunk16)),
        "decode_and_resample_44k1": per_call(lambda: audio.load(chunk44)),
        "plan_window_and_volume": per_call(lambda: streaming.plan_chunk(
            streaming.StreamState(identity=0, rng=np.random.default_rng(0)), a16)),
        "postprocess_chunk": per_call(finish),
        "json_encode_30_frames": per_call(lambda: responses.json_response(responses.animation(frames[:30], chunk_index=1))),
    }
    costs["sum_of_stages"] = sum(costs.values())
    return costs


def http_cost(n_sessions: int = 32, chunks_per_session: int = 30) -> dict:
    """Server CPU per chunk through real HTTP, with the stub model."""
    import socket

    from app import create_app
    from engine.service import InferenceService
    from runtime.settings import Settings
    from batching import MicroBatcher

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The server runs in a child process so its CPU time can be read alone;
    # it builds its threads (batcher, pools) after the fork.
    pid = os.fork()
    if pid == 0:
        settings = Settings(host="127.0.0.1", port=port, log_level="warning", max_batch=64).validate()
        service = InferenceService(settings)
        service.batcher = MicroBatcher(StubRunner(), max_batch=64, max_wait_s=0.002).start()
        app = create_app(settings, service)
        app.run(host="127.0.0.1", port=port, single_process=True, access_log=False, motd=False)
        os._exit(0)
    chunks = speech_chunks(8)

    def cpu_seconds() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def session(i: int) -> int:
        conn = Connection("127.0.0.1", port)
        status, body = await conn.request("POST", "/api/infer_stream_init", b"{}")
        sid = json.loads(body)["session_id"]
        ok = 0
        for k in range(chunks_per_session):
            status, _ = await conn.request(
                "POST", "/api/infer_stream_chunk", multipart(sid, chunks[(i + k) % len(chunks)]),
                f"multipart/form-data; boundary={BOUNDARY}",
            )
            ok += status == 200
        conn.close()
        return ok

    async def wait_ready():
        for _ in range(200):
            try:
                conn = Connection("127.0.0.1", port)
                status, _ = await conn.request("GET", "/api/health")
                conn.close()
                return
            except OSError:
                await asyncio.sleep(0.1)

    try:
        asyncio.run(wait_ready())
        asyncio.run(session(0))  # warm-up
        c0, t0 = cpu_seconds(), time.perf_counter()
        ok = sum(asyncio.run(_gather(session, n_sessions)))
        c1, t1 = cpu_seconds(), time.perf_counter()
    finally:
        os.kill(pid, 15)
        os.waitpid(pid, 0)
    return {
        "chunks": ok,
        "server_cpu_s_per_chunk": (c1 - c0) / ok,
        "wall_chunks_per_s": ok / (t1 - t0),
        "sessions": n_sessions,
    }


async def _gather(fn, n):
    return await asyncio.gather(*(fn(i) for i in range(n)))


def main() -> None:
    stages = stage_costs()
    for k, v in stages.items():
        print(f"{k:28} {v * 1e6:9.1f} us CPU")
    http = http_cost()
    per = http["server_cpu_s_per_chunk"]
    print(f"{'server CPU per chunk (HTTP)':28} {per * 1e6:9.1f} us  ({http['chunks']} chunks, "
          f"{http['wall_chunks_per_s']:.0f} chunks/s on this machine, client on the same cores)")
    print(f"=> one core sustains about {1 / per:.0f} chunks/s; 2,000 chunks/s needs about {2000 * per:.1f} cores")
    path = save("serving_overhead", {"machine": machine(), "stages_s": stages, "http": http})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
