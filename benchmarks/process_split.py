"""What the process split costs and buys, with the stub model (``--model stub``),
so that every CPU second measured is the server's own.

    python benchmarks/process_split.py [--chunks 3000] [--sessions 64]

1. Server CPU per chunk, all processes together (from /proc: the main
   process and every descendant), and the engine's alone, for one process
   (``--workers 0``), 1 worker + 1 engine and 2 workers + 1 engine, while
   ``--sessions`` clients send 1 s WAV chunks back to back. Also the mean
   engine batch size and the chunks per second reached (the client shares
   the machine's cores).
2. A chunk's round trip through the transport: the same session's chunks,
   one at a time, through an engine process versus an in-process service.

Writes benchmarks/out/process_split.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import BOUNDARY, Connection, cpu_s, free_port, machine, multipart, save, speech_chunks, tree  # noqa: E402

CONFIGS = {
    "one process": [],
    "1 worker + 1 engine": ["--workers", "1"],
    "2 workers + 1 engine": ["--workers", "2"],
}


def batch_stats(text: str) -> float | None:
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("a2e_batch_windows_sum"):
            total += float(line.split()[-1])
        elif line.startswith("a2e_batch_windows_count"):
            count += float(line.split()[-1])
    return total / count if count else None


async def load(port: int, sessions: int, chunks_total: int) -> int:
    bodies = speech_chunks(8)
    per = chunks_total // sessions

    async def one(i: int) -> int:
        conn = Connection("127.0.0.1", port)
        _, body = await conn.request("POST", "/api/infer_stream_init", b"{}")
        sid = json.loads(body)["session_id"]
        ctype = f"multipart/form-data; boundary={BOUNDARY}"
        ok = 0
        for k in range(per):
            status, _ = await conn.request("POST", "/api/infer_stream_chunk", multipart(sid, bodies[(i + k) % 8]), ctype)
            ok += status == 200
        await conn.request("DELETE", f"/api/infer_stream_close/{sid}")
        conn.close()
        return ok

    return sum(await asyncio.gather(*(one(i) for i in range(sessions))))


def measure(label: str, extra: list[str], sessions: int, chunks: int) -> dict:
    import urllib.request

    port = free_port()
    cmd = [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), "--model", "stub", "--max-batch", "64",
           "--max-wait-ms", "2", "--max-sessions-per-client", "100000", "--health-detail", "--log-level", "warning",
           *extra]  # fmt: skip
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        health = None
        for _ in range(300):
            try:
                with urllib.request.urlopen(url + "/api/health", timeout=2) as r:
                    health = json.load(r)
                    break
            except OSError:
                time.sleep(0.2)
        time.sleep(3 if extra else 0.5)  # every worker up
        engines = [e["pid"] for e in health.get("engines", [])] or [proc.pid]
        asyncio.run(load(port, 4, 200))  # warm-up
        pids = tree(proc.pid)
        c0, e0, t0 = cpu_s(pids), cpu_s(engines), time.perf_counter()
        ok = asyncio.run(load(port, sessions, chunks))
        c1, e1, t1 = cpu_s(pids), cpu_s(engines), time.perf_counter()
        with urllib.request.urlopen(url + "/metrics") as r:
            mean_batch = batch_stats(r.read().decode())
    finally:
        proc.terminate()
        proc.wait(30)
    row = {
        "config": label,
        "chunks": ok,
        "server_cpu_us_per_chunk": (c1 - c0) / ok * 1e6,
        "engine_cpu_us_per_chunk": (e1 - e0) / ok * 1e6 if extra else None,
        "chunks_per_s": ok / (t1 - t0),
        "mean_batch_windows": mean_batch,
        "processes": len(pids),
    }
    print(json.dumps(row), flush=True)
    return row


def round_trip(n: int = 1000) -> dict:
    """Sequential chunks of one session: through an engine process vs in-process."""
    from a2e.audio import load as decode
    from a2e.loudness import LoudnessMode
    from engine.client import EnginePool
    from engine.supervisor import EngineSupervisor
    from engine.service import InferenceService
    from runtime.settings import Settings

    settings = Settings(model="stub", log_level="warning").validate()
    chunk = decode(speech_chunks(1)[0])

    async def run(engine) -> float:
        sid = (await engine.open_session(0, 1, "continuous", LoudnessMode.OFF, "")).session_id
        for _ in range(50):
            await engine.stream_chunk(sid, chunk)
        t0 = time.perf_counter()
        for _ in range(n):
            await engine.stream_chunk(sid, chunk)
        return (time.perf_counter() - t0) / n

    local = InferenceService(settings)
    local.load()
    try:
        in_process = asyncio.run(run(local))
    finally:
        local.close()
    supervisor = EngineSupervisor(settings)
    supervisor.start()

    async def remote() -> float:
        pool = EnginePool(settings, supervisor.paths)
        await pool.connect()
        try:
            return await run(pool)
        finally:
            await pool.disconnect()

    try:
        through_engine = asyncio.run(remote())
    finally:
        supervisor.stop()
    row = {"in_process_us": in_process * 1e6, "engine_process_us": through_engine * 1e6,
           "transport_us": (through_engine - in_process) * 1e6}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=3000)
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    args = ap.parse_args()
    rows = [measure(name, CONFIGS[name], args.sessions, args.chunks) for name in args.configs.split(",")]
    rt = round_trip()
    print(save("process_split", {"machine": machine(), "rows": rows, "round_trip": rt, "sessions": args.sessions}))


if __name__ == "__main__":
    main()
