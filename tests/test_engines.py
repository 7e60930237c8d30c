"""HTTP workers and engine processes (``--workers 2 --devices cpu,cpu``):
the same frames as one process, sessions placed on both engines and served
by any worker, a killed worker or engine, one /metrics over all processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from a2e.audio import load
from a2e.loudness import LoudnessMode
from engine.session_ids import engine_of
from engine.transport import Ring
from engine.service import InferenceService
from runtime.settings import Settings
from tests.conftest import speech_like, wav_bytes
from tests.test_end_to_end import free_port, start, stop

CHUNKS = [speech_like(s, seed=i) for i, s in enumerate((1.0, 0.5, 1.7, 0.3, 1.0))]


@pytest.fixture(scope="module")
def server(checkpoint, config_file):
    port = free_port()
    env = dict(os.environ, A2E_LOG_LEVEL="warning")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    args = ["app.py", "--config-file", str(config_file), "--weight", str(checkpoint), "--workers", "2",
            "--devices", "cpu,cpu", "--health-detail", "--cpu-threads", "1", "--header-timeout-s", "1"]  # fmt: skip
    proc = start(args, port, env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60  # both workers up (health answers from the first)
    while time.time() < deadline and len(worker_pids(proc.pid, base, 10)) < 2:
        time.sleep(0.2)
    yield proc, base
    stop(proc)


def engine_pids(base: str) -> list[int]:
    return [e["pid"] for e in requests.get(base + "/api/health").json()["engines"]]


def worker_pids(main_pid: int, base: str, tries: int = 40) -> set[int]:
    """The HTTP workers that answer, each on a new connection (the kernel spreads them)."""
    seen = set()
    for _ in range(tries):
        try:
            res = requests.get(base + "/api/health", headers={"Connection": "close"}, timeout=5)
            seen.add(res.json()["worker_pid"])
        except (requests.RequestException, KeyError, ValueError):
            pass
    return seen


def stream(base: str, sid: str, chunks) -> list[np.ndarray]:
    out = []
    for x in chunks:
        # A new connection per chunk: the kernel spreads them over the workers.
        res = requests.post(
            base + "/api/infer_stream_chunk",
            data={"session_id": sid},
            files={"audio_chunk": ("c.wav", wav_bytes(x))},
            headers={"Connection": "close"},
        )
        assert res.status_code == 200, res.text
        out.append(np.array([f["weights"] for f in res.json()["frames"]]))
    return out


def open_session(base: str, seed: int) -> str:
    res = requests.post(base + "/api/infer_stream_init", json={"seed": seed}, headers={"Connection": "close"})
    assert res.status_code == 200, res.text
    return res.json()["session_id"]


@pytest.fixture(scope="module")
def reference(checkpoint, config_file):
    """Frames of the same seeded session from one in-process service, with the
    engines' thread count (float sums depend on how the work is split)."""
    import torch

    threads = torch.get_num_threads()
    service = InferenceService(Settings(config_file=str(config_file), weight=str(checkpoint), cpu_threads=1).validate())
    service.load()

    async def run():
        sid = (await service.open_session(0, 7, "continuous", LoudnessMode.OFF)).session_id
        chunks = [load(wav_bytes(x)) for x in CHUNKS]  # what the server decodes: 16-bit WAV
        return [np.round((await service.stream_chunk(sid, x)).frames.astype(np.float64), 6) for x in chunks]

    try:
        yield asyncio.run(run())
    finally:
        service.close()
        torch.set_num_threads(threads)


def test_seeded_sessions_give_the_frames_of_one_process(server, reference):
    _, base = server
    for _ in range(4):  # sessions land on both engines
        got = stream(base, open_session(base, 7), CHUNKS)
        for a, b in zip(got, reference):
            assert np.array_equal(a, b)


def test_sessions_are_spread_over_the_engines(server):
    _, base = server
    sids = [open_session(base, i) for i in range(6)]
    assert {engine_of(sid)[0] for sid in sids} == {0, 1}
    deadline = time.time() + 5  # each worker refreshes what it knows of the engines every second
    while time.time() < deadline:
        engines = requests.get(base + "/api/health").json()["engines"]
        if all(e["sessions"] >= 1 for e in engines):
            break
        time.sleep(0.2)
    assert [e["state"] for e in engines] == ["up", "up"] and all(e["sessions"] >= 1 for e in engines)
    for sid in sids:
        assert requests.delete(f"{base}/api/infer_stream_close/{sid}").status_code == 200


def test_whole_clips_and_bad_input_through_the_engines(server):
    _, base = server
    res = requests.post(base + "/api/infer", files={"audio_file": ("a.wav", wav_bytes(speech_like(2.0)))})
    assert res.status_code == 200 and res.json()["metadata"]["frame_count"] == 60
    res = requests.post(base + "/api/infer", files={"audio_file": ("a.wav", b"not audio")})
    assert res.status_code == 400
    res = requests.post(base + "/api/infer_stream_chunk", data={"session_id": "nope"}, files={"audio_chunk": ("c.wav", wav_bytes(CHUNKS[0]))})
    assert res.status_code == 404


def test_a_killed_worker_loses_no_session(server, reference):
    proc, base = server
    sid = open_session(base, 7)
    got = stream(base, sid, CHUNKS[:2])
    victim = min(worker_pids(proc.pid, base))
    os.kill(victim, signal.SIGKILL)
    got += stream(base, sid, CHUNKS[2:])  # the other worker (and then the restarted one) carry on
    for a, b in zip(got, reference):
        assert np.array_equal(a, b)
    deadline = time.time() + 60
    while time.time() < deadline and len(worker_pids(proc.pid, base, 10) - {victim}) < 2:
        time.sleep(0.2)
    assert len(worker_pids(proc.pid, base) - {victim}) == 2  # restarted


def test_a_killed_engine_loses_only_its_sessions(server):
    _, base = server
    sids = [open_session(base, i) for i in range(4)]
    on = {engine_of(sid)[0]: sid for sid in sids}
    os.kill(engine_pids(base)[0], signal.SIGKILL)
    deadline = time.time() + 60
    while time.time() < deadline:
        engines = requests.get(base + "/api/health").json()["engines"]
        if engines[0]["state"] == "up" and engines[0]["restarts"] == 1:
            break
        time.sleep(0.2)
    assert engines[0]["restarts"] == 1
    # The worker that answered health sees the engine back; the other may still
    # be reconnecting, and says so with 503 + Retry-After, as a client retries.
    while True:
        res = requests.post(base + "/api/infer_stream_chunk", data={"session_id": on[0]}, files={"audio_chunk": ("c.wav", wav_bytes(CHUNKS[0]))})
        if res.status_code != 503 or time.time() > deadline:
            break
        assert "Retry-After" in res.headers
        time.sleep(0.2)
    assert res.status_code == 404 and "engine restarted" in res.json()["detail"]
    stream(base, on[1], CHUNKS[:1])  # the other engine's session is untouched
    new = [open_session(base, 9) for _ in range(2)]
    assert engine_of(new[0])[0] == 0  # the restarted engine, now the least loaded, takes new sessions
    for sid in new:
        stream(base, sid, CHUNKS[:1])


def test_workers_cut_off_slow_headers_too(server):
    import socket

    _, base = server
    port = int(base.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    t0 = time.monotonic()
    try:
        for byte in b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            sock.send(bytes([byte]))
            time.sleep(0.05)
    except (BrokenPipeError, ConnectionResetError):
        pass
    sock.settimeout(5)
    try:
        while sock.recv(4096):
            pass
    except (socket.timeout, ConnectionResetError):
        pass
    assert time.monotonic() - t0 < 4  # 1 s header deadline, checked every 0.5 s
    sock.close()


def test_a_mistyped_weight_stops_start_up_with_workers(config_file, tmp_path):
    import subprocess
    import sys

    from tests.test_end_to_end import ROOT

    proc = subprocess.run(
        [sys.executable, "app.py", "--config-file", str(config_file), "--weight", str(tmp_path / "typo.tar"),
         "--workers", "1", "--devices", "cpu", "--port", str(free_port())],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "typo.tar" in proc.stderr and "does not exist" in proc.stderr


def test_one_metrics_view_over_all_processes(server):
    _, base = server
    sid = open_session(base, 1)
    stream(base, sid, CHUNKS[:2])
    text = requests.get(base + "/metrics").text
    assert 'a2e_batch_windows_count{engine="0"}' in text and 'a2e_batch_windows_count{engine="1"}' in text
    sessions = {line.split("}")[0] + "}": float(line.split()[-1]) for line in text.splitlines() if line.startswith("a2e_sessions_active{")}
    assert set(sessions) == {'a2e_sessions_active{engine="0"}', 'a2e_sessions_active{engine="1"}'}  # summed over processes
    assert 'a2e_http_requests_total{endpoint="/api/infer_stream_chunk",method="POST",status="200"}' in text


# -- the transport alone -----------------------------------------------------------------


async def test_rings_carry_arrays_and_fall_back_inline_when_full(tmp_path):
    path = str(tmp_path / "s.sock")
    got = []

    async def serve(reader, writer):
        from engine.transport import accept_channel

        channel, _ = await accept_channel(reader, writer, {}, ring_bytes=4096)
        for _ in range(5):
            header, arrays = await channel.recv()
            got.append((header["n"], arrays[0]))
            await channel.send({"n": header["n"]}, [arrays[0] * 2])
        channel.close()

    server = await asyncio.start_unix_server(serve, path)
    from engine.transport import open_channel

    channel, _ = await open_channel(path, {}, ring_bytes=4096)
    # 2000 floats: larger than the ring; an empty [0, 52] array (a chunk that completed no frame)
    sent = [np.arange(n, dtype=np.float32) for n in (10, 500, 2000, 300)] + [np.zeros((0, 52), np.float32)]
    for i, x in enumerate(sent):
        await channel.send({"n": i}, [x])
        header, arrays = await channel.recv()
        assert header["n"] == i and np.array_equal(arrays[0], x * 2) and arrays[0].shape == x.shape
    assert [n for n, _ in got] == [0, 1, 2, 3, 4] and all(np.array_equal(a, x) for (_, a), x in zip(got, sent))
    channel.close()
    server.close()


def test_a_ring_never_overwrites_what_the_peer_has_not_read():
    ring = Ring.create(1024)
    try:
        a = ring.put(np.ones(100, np.float32))  # 400 bytes
        b = ring.put(np.ones(100, np.float32))
        assert a is not None and b is not None
        assert ring.put(np.ones(100, np.float32)) is None  # would wrap onto a, unread
        ring.release(a[3])
        assert ring.put(np.ones(100, np.float32)) is not None
    finally:
        ring.close()


def test_sigterm_answers_in_flight_requests_and_stops_every_process(checkpoint, config_file):
    from concurrent.futures import ThreadPoolExecutor

    port = free_port()
    args = ["app.py", "--config-file", str(config_file), "--weight", str(checkpoint), "--workers", "2",
            "--devices", "cpu,cpu", "--graceful-shutdown-s", "5", "--max-batch", "1", "--health-detail",
            "--no-auto-limits"]  # fmt: skip
    proc = start(args, port, dict(os.environ, A2E_LOG_LEVEL="warning"))
    base = f"http://127.0.0.1:{port}"
    engines = engine_pids(base)
    clip = wav_bytes(speech_like(60.0))

    def post():
        try:
            return requests.post(base + "/api/infer", files={"audio_file": ("a.wav", clip)}, timeout=60).status_code
        except requests.ConnectionError:
            return "reset"

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post) for _ in range(8)]
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        statuses = [f.result() for f in futures]
    assert proc.wait(30) == 0
    assert "reset" not in statuses and set(statuses) <= {200, 503}, statuses
    for pid in engines:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
