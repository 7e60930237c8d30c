"""The real server process, started with the API document's command and flags,
driven by the document's own Python examples (standard, streaming, batch)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf

from a2e import audio as audio_io
from tests.conftest import ENGLISH, wav_bytes

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, port, env=None, **https):
    """The server, once healthy; ``https``: it speaks HTTPS, checked with these
    requests arguments (``verify`` the CA, ``cert`` a client certificate)."""
    cmd = [sys.executable, *args, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    wait_until_healthy(proc, port, **https)
    return proc


def wait_until_healthy(proc, port, poll_s=0.2, timeout_s=60.0, **https):
    """Until /api/health first answers 200 (polled every ``poll_s``, as a readiness probe does)."""
    deadline = time.time() + timeout_s
    url = f"{'https' if https else 'http'}://127.0.0.1:{port}/api/health"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{proc.stdout.read() if proc.stdout else ''}")
        try:
            if requests.get(url, timeout=1, **https).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # with workers, the port opens before they serve
            pass
        time.sleep(poll_s)
    proc.kill()
    raise AssertionError("server did not start")


def stop(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


CLUSTERS: dict[str, object] = {}  # a cluster's HAProxy address -> the cluster (its nodes' metrics)


@pytest.fixture(
    scope="module",
    params=[[], ["--workers", "2", "--devices", "cpu,cpu"], "cluster"],
    ids=["one-process", "2-workers-2-engines", "3-nodes-redis-haproxy"],
)
def server(request, checkpoint, config_file, tmp_path_factory):
    """The server the document's clients talk to: one process, workers and
    engines, or three nodes sharing Redis behind HAProxy (round robin)."""
    model = ["--config-file", str(config_file), "--weight", str(checkpoint)]
    if request.param == "cluster":
        from tests.cluster_parts import Cluster

        cluster = Cluster(tmp_path_factory.mktemp("cluster"), [model] * 3, env={"A2E_MAX_UPLOAD_MB": "1"}).start()
        CLUSTERS[cluster.url] = cluster
        yield cluster.url
        cluster.stop()
        return
    port = free_port()
    env = dict(os.environ, A2E_MAX_UPLOAD_MB="1", A2E_LOG_LEVEL="warning")
    proc = start(["api_server.py", *model, *request.param], port, env)
    yield f"http://127.0.0.1:{port}"
    stop(proc)


def metrics_of(server: str) -> str:
    """The server's /metrics; a cluster's from every node (a balancer would show one node's)."""
    cluster = CLUSTERS.get(server)
    return cluster.metrics() if cluster is not None else requests.get(server + "/metrics").text


def test_document_standard_example(server, tmp_path):
    test_wav = tmp_path / "test.wav"
    test_wav.write_bytes(ENGLISH.read_bytes()[:300_000])  # under the 1 MB limit set for this server
    url = server + "/api/infer"
    files = {"audio_file": open(test_wav, "rb")}
    data = {"id_idx": 0, "ex_vol": False, "movement_smooth": True, "brow_movement": True}
    response = requests.post(url, files=files, data=data)
    result = response.json()
    assert response.status_code == 200
    assert result["metadata"]["frame_count"] == len(result["frames"]) > 0
    assert result["metadata"]["inference_time"] > 0


@pytest.mark.parametrize("seconds,frames", [(8.0, 240), (3.05, 92)])  # 3.05 s: a 0.05 s last chunk
def test_document_streaming_example(server, tmp_path, seconds, frames):
    response = requests.post(server + "/api/infer_stream_init", json={"id_idx": 0})
    session_id = response.json()["session_id"]
    audio, sr = sf.read(str(ENGLISH))  # stereo, as in the document's example
    audio = audio[: int(seconds * sr)]
    chunk_size = sr
    all_results = []
    for i in range(0, len(audio), chunk_size):
        chunk = audio[i : i + chunk_size]
        chunk_file = tmp_path / f"temp_chunk_{i}.wav"
        sf.write(chunk_file, chunk, sr)
        files = {"audio_chunk": open(chunk_file, "rb")}
        data = {"session_id": session_id}
        response = requests.post(server + "/api/infer_stream_chunk", files=files, data=data)
        assert response.status_code == 200, response.text
        all_results.append(response.json())
    close = requests.delete(f"{server}/api/infer_stream_close/{session_id}")
    assert close.json()["message"] == "Session closed"
    assert [r["metadata"]["chunk_index"] for r in all_results] == list(range(1, len(all_results) + 1))
    assert sum(r["metadata"]["frame_count"] for r in all_results) == frames


def test_a_chunk_shorter_than_a_frame_answers_no_frames(server):
    session_id = requests.post(server + "/api/infer_stream_init", json={}).json()["session_id"]
    counts = []
    for size in (16, 200, 400, 16000):  # 1 ms completes frame 0, 12.5 ms none, 25 ms frame 1, then 1 s 30 more
        res = requests.post(
            server + "/api/infer_stream_chunk",
            files={"audio_chunk": ("c.wav", wav_bytes(np.full(size, 0.1, np.float32)))},
            data={"session_id": session_id},
        )
        assert res.status_code == 200, res.text
        counts.append(res.json()["metadata"]["frame_count"])
    requests.delete(f"{server}/api/infer_stream_close/{session_id}")
    assert counts == [1, 0, 1, 30] and sum(counts) == -(-(16 + 200 + 400 + 16000) * 30 // 16000)


def test_document_microphone_example_with_a_file_for_the_microphone(server):
    """The document's real-time scenario posts raw int16 PCM from the microphone
    (``stream.read(16000)``) named chunk.wav, with no header: it is read as 16 kHz
    mono 16-bit little-endian and animates exactly like the same audio as WAV."""
    audio = audio_io.load(Path(ENGLISH).read_bytes())[: 16000 * 4]
    pcm = (np.clip(audio, -1, 32767 / 32768) * 32768).astype("<i2")
    frames = {}
    for kind in ("raw", "wav"):
        session_id = requests.post(server + "/api/infer_stream_init", json={"id_idx": 0, "seed": 3}).json()["session_id"]
        got = []
        for pos in range(0, len(pcm), 16000):  # what stream.read(16000) returns, one second at a time
            part = pcm[pos : pos + 16000]
            body = part.tobytes() if kind == "raw" else wav_bytes(part.astype(np.float32) / 32768, subtype="PCM_16")
            res = requests.post(
                server + "/api/infer_stream_chunk",
                files={"audio_chunk": ("chunk.wav", body)},
                data={"session_id": session_id},
            )
            assert res.status_code == 200, res.text
            got += [f["weights"] for f in res.json()["frames"]]
        requests.delete(f"{server}/api/infer_stream_close/{session_id}")
        frames[kind] = np.array(got)
    assert frames["raw"].shape == (120, 52)
    assert np.array_equal(frames["raw"], frames["wav"])
    exposition = metrics_of(server)
    assert _metric(exposition, 'a2e_stream_first_frame_latency_seconds_count{transport="rest"}') >= 8
    assert _metric(exposition, 'a2e_stream_frames_per_second_count{transport="rest"}') >= 2  # both sessions closed


def test_document_batch_example(server, tmp_path):
    audio_dir = tmp_path / "audio_files"
    audio_dir.mkdir()
    for i in range(3):
        sf.write(audio_dir / f"clip{i}.wav", np.random.default_rng(i).standard_normal(8000 * (i + 1)) * 0.1, 16000)
    output_dir = tmp_path / "results"
    output_dir.mkdir()
    for audio_file in sorted(audio_dir.glob("*.wav")):
        files = {"audio_file": open(audio_file, "rb")}
        response = requests.post(server + "/api/infer", files=files, data={"movement_smooth": True})
        with open(output_dir / f"{audio_file.stem}.json", "w") as f:
            json.dump(response.json(), f)
    counts = [json.loads((output_dir / f"clip{i}.json").read_text())["metadata"]["frame_count"] for i in range(3)]
    assert counts == [15, 30, 45]


def test_real_server_enforces_body_limit_and_keeps_serving(server):
    res = requests.post(server + "/api/infer", files={"audio_file": ("big.wav", b"\0" * 2_000_000)})
    assert res.status_code == 413
    assert requests.get(server + "/api/health").json()["status"] == "healthy"


def test_bad_checkpoint_stops_start_up_with_its_reason(tmp_path, config_file):
    bad = tmp_path / "bad.tar"
    bad.write_text("not a checkpoint")
    proc = subprocess.run(
        [sys.executable, "app.py", "--config-file", str(config_file), "--weight", str(bad), "--port", str(free_port())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "not a readable torch checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_flag_value_is_reported(config_file):
    proc = subprocess.run(
        [sys.executable, "app.py", "--config-file", str(config_file), "--context-mode", "sideways"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "context_mode" in proc.stderr


# -- the WebSocket stream ----------------------------------------------------------------


def _metric(exposition: str, series: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in exposition.splitlines() if line.startswith(series + " "))


def _ws(server):
    from websockets.sync.client import connect

    return connect(server.replace("http://", "ws://") + "/api/stream", open_timeout=10)


def _english_s16(seconds):
    audio = audio_io.load(Path(ENGLISH).read_bytes())[: int(16000 * seconds)]
    return (np.clip(audio, -1, 32767 / 32768) * 32768).astype("<i2")


def test_websocket_stream_of_20ms_packets(server):
    pcm = _english_s16(3.01)
    with _ws(server) as ws:
        ws.send(json.dumps({"type": "start", "id_idx": 1, "seed": 4, "hop": 0.25}))
        started = json.loads(ws.recv(10))
        assert started["type"] == "started" and len(started["names"]) == 52 and started["hop"] == 0.25
        for pos in range(0, len(pcm), 320):  # 20 ms packets, as fast as they go
            ws.send(pcm[pos : pos + 320].tobytes())
        ws.send(json.dumps({"type": "end"}))
        frames, firsts = [], []
        while True:
            message = json.loads(ws.recv(30))
            if message["type"] == "end":
                break
            assert message["type"] == "frames", message
            firsts.append(message["first_frame"])
            frames += message["frames"]
    assert message["frames"] == len(frames) == 91  # ceil(3.01 x 30): the whole clip's count
    exposition = metrics_of(server)
    for series in ('a2e_stream_first_frame_latency_seconds_count{transport="websocket"}',
                   'a2e_stream_frames_per_second_count{transport="websocket"}'):  # fmt: skip
        assert _metric(exposition, series) >= 1
    assert message["audio_seconds"] == pytest.approx(len(pcm) / 16000)
    assert [f["time"] for f in frames] == pytest.approx([k / 30 for k in range(91)])  # every frame once, in order
    assert firsts[0] == 0 and firsts == sorted(firsts)


def test_websocket_frames_equal_rest_chunks_of_the_hop(server):
    """Packets of exactly one hop, each awaited: the same chunks as REST's, the same frames."""
    pcm = _english_s16(2.0)
    with _ws(server) as ws:
        ws.send(json.dumps({"type": "start", "seed": 8, "hop": 0.5}))
        json.loads(ws.recv(10))
        got = []
        for pos in range(0, len(pcm), 8000):
            ws.send(pcm[pos : pos + 8000].tobytes())
            got += json.loads(ws.recv(30))["frames"]
        ws.send(json.dumps({"type": "end"}))
        assert json.loads(ws.recv(30))["type"] == "end"
    session_id = requests.post(server + "/api/infer_stream_init", json={"seed": 8}).json()["session_id"]
    want = []
    for pos in range(0, len(pcm), 8000):
        res = requests.post(
            server + "/api/infer_stream_chunk",
            files={"audio_chunk": ("c.pcm", pcm[pos : pos + 8000].tobytes())},
            data={"session_id": session_id},
        )
        want += res.json()["frames"]
    requests.delete(f"{server}/api/infer_stream_close/{session_id}")
    assert len(got) == len(want) == 60
    assert np.array_equal([f["weights"] for f in got], [f["weights"] for f in want])


@pytest.mark.parametrize(
    "start,status",
    [
        ("not json", 422),
        ({"type": "start", "encoding": "mulaw"}, 422),
        ({"type": "start", "hop": 0.001}, 422),
        ({"type": "start", "id_idx": 99}, 422),
        ({"type": "hello"}, 422),
    ],
)
def test_websocket_bad_start_is_told_and_closed(server, start, status):
    from websockets.exceptions import ConnectionClosed

    with _ws(server) as ws:
        ws.send(start if isinstance(start, str) else json.dumps(start))
        message = json.loads(ws.recv(10))
        assert message["type"] == "error" and message["status"] == status
        with pytest.raises(ConnectionClosed):
            ws.recv(10)
        assert ws.close_code == 1008


def test_websocket_client_too_far_ahead_is_told(server):
    from websockets.exceptions import ConnectionClosed

    with _ws(server) as ws:
        ws.send(json.dumps({"type": "start", "hop": 3.0}))
        json.loads(ws.recv(10))
        ws.send(np.zeros(16000 * 11, dtype="<i2").tobytes())  # 11 s at once: beyond the 10 s that may wait
        message = json.loads(ws.recv(10))
        assert message["type"] == "error" and message["status"] == 503 and "falling behind" in message["detail"]
        with pytest.raises(ConnectionClosed):
            ws.recv(10)
        assert ws.close_code == 1013


def test_websocket_stated_format_is_resampled(server):
    pcm = _english_s16(1.0).astype(np.float32) / 32768
    stereo48 = np.repeat(np.stack([pcm, pcm], axis=1), 3, axis=0).astype("<f4")  # 48 kHz float32 stereo
    with _ws(server) as ws:
        ws.send(json.dumps({"type": "start", "sample_rate": 48000, "encoding": "f32le", "channels": 2}))
        assert json.loads(ws.recv(10))["sample_rate"] == 48000
        data = stereo48.tobytes()
        for pos in range(0, len(data), 7000):  # packets that split samples and frames
            ws.send(data[pos : pos + 7000])
        ws.send(json.dumps({"type": "end"}))
        frames = 0
        while (m := json.loads(ws.recv(30)))["type"] != "end":
            frames += len(m["frames"])
    assert frames == m["frames"] == 30 and m["audio_seconds"] == pytest.approx(1.0)
