"""Helpers shared by the benchmarks, so that no benchmark imports another: a
random-weight checkpoint in the released layout, the machine's description
and result files; a server started on a free port; a small asyncio HTTP/1.1
client with pre-built multipart bodies (on a small machine it takes as little
CPU as possible from the server it measures), paced REST sessions and their
latencies; and the CPU time of a process tree, from /proc."""

from __future__ import annotations

import asyncio
import io
import json
import os
import platform
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"


def released_checkpoint(path: Path | None = None) -> Path:
    """A random-weight checkpoint of the released layout (written once, reused)."""
    from a2e.checkpoint import save_checkpoint
    from a2e.model import Audio2Expression, ModelDims

    path = path or OUT / "random_released_layout.tar"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        save_checkpoint(Audio2Expression(ModelDims.released()).eval(), path)
    return path


def machine() -> dict:
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = "unknown"
    return info


def save(name: str, payload: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


# -- load: a server, its client, paced REST sessions ------------------------------
BOUNDARY = "a2eBenchBoundary"
STATUSES: dict[int, int] = {}  # non-200 answers seen, by status


def speech_chunks(n: int, seconds: float = 1.0) -> list[bytes]:
    """n distinct 1 s WAV chunks (voiced bursts with pauses)."""
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        t = np.arange(int(16000 * seconds)) / 16000
        env = (np.sin(2 * np.pi * (1.1 + 0.1 * i) * t) > -0.3).astype(np.float32)
        x = (0.25 * np.sin(2 * np.pi * (150 + 5 * i) * t) + 0.03 * rng.standard_normal(len(t))) * env
        buf = io.BytesIO()
        sf.write(buf, x.astype(np.float32), 16000, format="WAV", subtype="PCM_16")
        out.append(buf.getvalue())
    return out


def multipart(session_id: str, chunk: bytes, chunk_index: int | None = None) -> bytes:
    numbered = "" if chunk_index is None else (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="chunk_index"\r\n\r\n{chunk_index}\r\n'
    )
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="session_id"\r\n\r\n{session_id}\r\n{numbered}'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="audio_chunk"; filename="c.wav"\r\n'
        f"Content-Type: audio/wav\r\n\r\n"
    ).encode() + chunk + f"\r\n--{BOUNDARY}--\r\n".encode()


class Connection:
    """One keep-alive HTTP/1.1 connection (enough for this benchmark's
    requests), over TLS when given a client context; ``fresh``: a new
    connection for every request, closed after its answer."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None, fresh: bool = False) -> None:
        self.host, self.port, self.tls, self.fresh = host, port, tls, fresh
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"", ctype: str = "application/json",
                      session: str = "") -> tuple[int, bytes]:  # fmt: skip
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, ssl=self.tls)
        # X-Session-Id, as our client sends it: what a balancer hashing on the session reads.
        extra = f"X-Session-Id: {session}\r\n" if session else ""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: {ctype}\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        body = await self.reader.readexactly(length)
        if self.fresh:
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = self.reader = None


async def run_session(url, index, n_sessions, chunks, n_chunks, t_start, results, chunk_s=1.0, numbered=False,
                      tls=None, fresh=False):  # fmt: skip
    u = urlparse(url)
    conn = Connection(u.hostname, u.port or 80, tls, fresh)
    status, body = await conn.request("POST", "/api/infer_stream_init", json.dumps({"id_idx": index % 12}).encode())
    if status != 200:
        results.append({"error": f"init {status}"})
        return
    sid = json.loads(body)["session_id"]
    # numbered: chunk_index on every chunk, as a2e_client and locust send it.
    bodies = [multipart(sid, chunks[(index + k) % len(chunks)], k + 1 if numbered else None) for k in range(n_chunks)]
    ctype = f"multipart/form-data; boundary={BOUNDARY}"
    offset = chunk_s * index / n_sessions  # spread sessions over a chunk's time, as independent clients would be
    latencies, on_time, errors = [], True, 0
    for k in range(n_chunks):
        due = t_start + offset + k * chunk_s
        now = time.perf_counter()
        if now < due:
            await asyncio.sleep(due - now)
        status, _ = await conn.request("POST", "/api/infer_stream_chunk", bodies[k], ctype, sid)
        done = time.perf_counter()
        latencies.append(done - due)
        if status != 200:
            errors += 1
            STATUSES[status] = STATUSES.get(status, 0) + 1
        if done > due + chunk_s:  # the next chunk was due before this answer came
            on_time = False
    await conn.request("DELETE", f"/api/infer_stream_close/{sid}", session=sid)
    conn.close()
    results.append({"latencies": latencies, "on_time": on_time and errors == 0, "errors": errors})


async def run_level(url: str | list[str], n: int, n_chunks: int, chunks: list[bytes], chunk_s: float = 1.0,
                    numbered: bool = False, tls: ssl.SSLContext | None = None, fresh: bool = False) -> dict:  # fmt: skip
    """``n`` paced sessions against ``url``, or against several: session i
    then goes wholly to ``url[i % len(url)]``; ``tls``: the client context for
    https URLs; ``fresh``: a new connection per request (no keep-alive)."""
    urls = [url] if isinstance(url, str) else url
    results: list[dict] = []
    t_start = time.perf_counter() + 0.5
    await asyncio.gather(*(run_session(urls[i % len(urls)], i, n, chunks, n_chunks, t_start, results, chunk_s, numbered,
                                       tls, fresh)
                           for i in range(n)))  # fmt: skip
    lat = np.array([x for r in results if "latencies" in r for x in r["latencies"]])
    first = np.array([r["latencies"][0] for r in results if "latencies" in r])
    kept = sum(1 for r in results if r.get("on_time"))
    return {
        "sessions": n,
        "kept_real_time": kept,
        "errors": sum(r.get("errors", 1) for r in results),
        "p50": float(np.percentile(lat, 50)) if lat.size else None,
        "p90": float(np.percentile(lat, 90)) if lat.size else None,
        "p99": float(np.percentile(lat, 99)) if lat.size else None,
        "first_chunk_p50": float(np.percentile(first, 50)) if first.size else None,
        "first_chunk_max": float(first.max()) if first.size else None,
    }


def rest_comparison(url: str, server_pid: int, n: int, seconds: float) -> dict:
    """N REST sessions of 1 s WAV chunks for ``seconds``, with the server's and
    this client's CPU per second of audio: the baseline the streaming
    benchmarks measure against in the same run."""
    chunks = speech_chunks(16, 1.0)
    cpu0, mine0 = cpu_s(tree(server_pid)), time.process_time()
    row = asyncio.run(run_level(url, n, int(seconds), chunks, 1.0))
    cpu, mine = cpu_s(tree(server_pid)) - cpu0, time.process_time() - mine0
    row.update(transport="rest", chunk_s=1.0, server_cpu_ms_per_audio_s=round(1000 * cpu / (n * seconds), 3),
               client_cpu_ms_per_audio_s=round(1000 * mine / (n * seconds), 3))  # fmt: skip
    print(
        f"REST 1 s chunks N={n:4d} kept={row['kept_real_time']:4d} p50={row['p50']:.3f} p99={row['p99']:.3f} "
        f"errors={row['errors']} server CPU {row['server_cpu_ms_per_audio_s']:.2f} ms per audio s "
        f"(client {row['client_cpu_ms_per_audio_s']:.2f})",
        flush=True,
    )
    return row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(weight: Path, max_batch: int, extra: list[str],
                 tls: ssl.SSLContext | None = None) -> tuple[subprocess.Popen, str]:  # fmt: skip
    """The server on a free port, healthy; ``tls``: the client context that
    trusts its certificate (``extra`` then holds --tls-cert and --tls-key)."""
    import urllib.request

    port = free_port()
    cmd = [sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(port), "--weight", str(weight),
           "--max-batch", str(max_batch), "--log-level", "warning",
           # every simulated client comes from 127.0.0.1: lift the per-client session cap
           "--max-sessions-per-client", "1000000", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/api/health", timeout=1, context=tls) as r:
                if json.load(r)["status"] == "healthy":
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not become healthy")


# -- CPU time of a process tree ----------------------------------------------------
TICK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, pp in parents.items() if pp == p]
    return out


def cpu_s(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / TICK
