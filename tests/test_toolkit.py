"""What users reach for first, against a real server: the export formats of
/api/infer, the OpenAPI description (validated, in step with the routes, and
driving a client built from it), the Python client and the lam-a2e
command, and the access log."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import pygltflib
import pytest
import requests
from openapi_spec_validator import validate

from a2e.constants import channel_index
from a2e_client import Client, ServerError
from a2e_client.client import pcm_chunks
from tests.test_end_to_end import free_port, stop

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "server" / "demo" / "samples" / "english.flac"  # shipped, 8.0 s


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "server.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "app.py", "--model", "a2e-lite", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, env=dict(os.environ, A2E_LOG_LEVEL="info"))  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if requests.get(url + "/api/health", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.2)
    yield url, proc, log
    if proc.poll() is None:
        stop(proc)


def infer(url, fmt, seed=4):
    res = requests.post(url + "/api/infer", files={"audio_file": SAMPLE.open("rb")}, data={"seed": seed, "format": fmt})
    assert res.status_code == 200, res.text
    return res


def test_every_export_format_reads_back_as_the_json(server):
    url, _, _ = server
    want = np.array([f["weights"] for f in infer(url, "json").json()["frames"]])
    assert want.shape == (240, 52)
    named = infer(url, "json_named").json()
    assert np.allclose([[f["blendshapes"][n] for n in named["frames"][0]["blendshapes"]] for f in named["frames"]], want, atol=1e-6)
    res = infer(url, "csv")
    assert res.headers["content-type"].startswith("text/csv") and "animation.csv" in res.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(res.text)))
    assert len(rows) == 240 and np.allclose([float(r["JawOpen"]) for r in rows], want[:, channel_index("jawOpen")], atol=1e-6)
    res = infer(url, "gltf")
    assert res.headers["content-type"] == "model/gltf-binary"
    glb = pygltflib.GLTF2.load_from_bytes(res.content)
    view = glb.bufferViews[glb.accessors[glb.animations[0].samplers[0].output].bufferView]
    got = np.frombuffer(glb.binary_blob()[view.byteOffset : view.byteOffset + view.byteLength], dtype=np.float32)
    assert np.allclose(got.reshape(240, 52), want, atol=1e-6)
    lines = infer(url, "ndjson").text.splitlines()
    assert len(lines) == 241 and np.allclose([json.loads(line)["weights"] for line in lines[1:]], want, atol=1e-6)
    bad = requests.post(url + "/api/infer", files={"audio_file": SAMPLE.open("rb")}, data={"format": "fbx"})
    assert bad.status_code == 400 and "unknown format 'fbx'" in bad.json()["detail"]
    assert all(name in bad.json()["detail"] for name in ("json", "json_named", "csv", "gltf", "ndjson"))
    # the format in the query, as curl users write it first
    as_query = requests.post(url + "/api/infer?format=csv", files={"audio_file": SAMPLE.open("rb")}, data={"seed": 4})
    assert as_query.status_code == 200 and as_query.headers["content-type"].startswith("text/csv")
    assert as_query.text == infer(url, "csv").text
    bad = requests.post(url + "/api/infer?format=fbx", files={"audio_file": SAMPLE.open("rb")})
    assert bad.status_code == 400 and "unknown format 'fbx'" in bad.json()["detail"]


def test_openapi_is_valid_and_in_step_with_the_routes(server):
    from app import create_app
    from runtime.settings import Settings

    url, _, _ = server
    spec = requests.get(url + "/openapi.json").json()
    validate(spec)
    app = create_app(Settings(model="stub"))
    routes = set()
    for route in app.router.routes:
        path = "/" + route.path.lstrip("/")
        if route.extra.websocket or path.startswith("/demo/<"):
            continue  # the WebSocket (README) and the demo page's own files
        path = path.replace("<session_id:str>", "{session_id}")
        routes |= {(path, m.lower()) for m in route.methods if m not in ("HEAD", "OPTIONS")}
    documented = {(path, m) for path, ops in spec["paths"].items() for m in ops}
    assert routes == documented
    page = requests.get(url + "/docs")
    assert page.status_code == 200 and "/openapi.json" in page.text


def test_a_client_built_from_the_description_gets_what_it_promises(server):
    """Every operation called as the description says, its answer checked against its schema."""
    url, _, _ = server
    spec = requests.get(url + "/openapi.json").json()
    ops = {op["operationId"]: (path, method, op) for path, item in spec["paths"].items() for method, op in item.items()}

    def call(op_id, **kwargs):
        path, method, op = ops[op_id]
        res = requests.request(method, url + path.format(**kwargs.pop("path", {})), **kwargs)
        schema = op["responses"][str(res.status_code)]["content"][res.headers["content-type"].split(";")[0]]["schema"]
        if res.headers["content-type"].startswith("application/json"):
            jsonschema.validate(res.json(), {**schema, "components": spec["components"]})
        return res

    call("root"), call("health"), call("openapi")
    call("infer", files={"audio_file": SAMPLE.open("rb")}, data={"id_idx": "1"})
    sid = call("streamInit", json={"id_idx": 2, "seed": 1, "tuning": {"multipliers": {"JawOpen": 1.1}}}).json()["session_id"]
    call("streamChunk", files={"audio_chunk": SAMPLE.open("rb")}, data={"session_id": sid})
    assert call("streamClose", path={"session_id": sid}).json()["chunks_processed"] == 1
    assert call("streamClose", path={"session_id": sid}).status_code == 404
    assert call("infer", files={"audio_file": ("x.txt", b"hello")}).status_code == 400


def test_python_client(server, monkeypatch):
    url, _, _ = server
    client = Client(url)
    assert client.health()["model"]["name"] == "a2e-lite"
    whole = client.animate(SAMPLE, seed=2)
    assert whole["metadata"]["frame_count"] == 240
    assert client.animate(SAMPLE, format="csv").startswith(b"Timecode,BlendShapeCount,")
    # 0.7 s chunks: the last one short; every frame once, at its session time.
    frames = list(client.stream_file(SAMPLE, chunk_s=0.7, seed=2))
    assert len(frames) == 240 and [round(f["time"] * 30) for f in frames] == list(range(240))
    ws = list(client.stream_websocket(pcm_chunks(SAMPLE, 0.1), seed=2))
    assert len(ws) == 240
    # A failing chunk closes the session.
    before = client.health()["sessions"]
    with pytest.raises(ServerError) as caught:
        list(client.stream([b"\x00\x01" * 100, b"not audio at all, just text"], pcm=False))
    assert caught.value.status == 400 and client.health()["sessions"] == before
    # 503 with Retry-After is retried after the time it says.
    answers = iter([(503, {"Retry-After": "0"}), (200, {})])
    waited = []
    real = client.http.request

    def fake(method, full_url, **kwargs):
        status, headers = next(answers, (200, {}))
        if status == 200:
            return real(method, full_url, **kwargs)
        res = requests.Response()
        res.status_code, res.headers, res._content = status, requests.structures.CaseInsensitiveDict(headers), b"{}"
        return res

    monkeypatch.setattr(client.http, "request", fake)
    monkeypatch.setattr("a2e_client.client.time.sleep", waited.append)
    assert client.health()["status"] == "healthy" and waited == [0.0]


def test_the_command_line(server, tmp_path):
    url, _, _ = server
    run = lambda *args: subprocess.run([sys.executable, "-m", "a2e_client", "--url", url, *args], cwd=ROOT,  # noqa: E731
                                       capture_output=True, text=True, timeout=120)  # fmt: skip
    out = run("animate", str(SAMPLE), "-o", str(tmp_path / "a.glb"))
    assert out.returncode == 0, out.stderr
    assert pygltflib.GLTF2.load_from_bytes((tmp_path / "a.glb").read_bytes()).meshes[0].extras["targetNames"][24] == "jawOpen"
    out = run("stream", str(SAMPLE), "--chunk-s", "0.5", "-o", str(tmp_path / "s.ndjson"))
    assert out.returncode == 0 and "240 frames" in out.stderr
    assert len((tmp_path / "s.ndjson").read_text().splitlines()) == 240
    out = run("animate", str(tmp_path / "missing.wav"))
    assert out.returncode == 1 and "error:" in out.stderr
    out = run("animate", str(SAMPLE), "--format", "json", "--id-idx", "99")
    assert out.returncode == 1 and "422" in out.stderr and "id_idx" in out.stderr


def test_logs_of_a_short_session(server):
    url, proc, log = server
    sid = requests.post(url + "/api/infer_stream_init", json={}).json()["session_id"]
    requests.post(url + "/api/infer_stream_chunk", files={"audio_chunk": SAMPLE.open("rb")}, data={"session_id": sid})
    requests.delete(f"{url}/api/infer_stream_close/{sid}")
    requests.post(url + "/api/infer_stream_init", json={"id_idx": -1})
    proc.send_signal(signal.SIGTERM)
    proc.wait(20)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any(line["msg"].startswith("serving on http://127.0.0.1:") for line in lines)
    access = [line for line in lines if line["logger"] == "a2e.access"]
    chunk = next(line for line in access if line["path"] == "/api/infer_stream_chunk" and line.get("session_id") == sid)
    assert chunk["status"] == 200 and chunk["session_id"] == sid and chunk["duration_ms"] > 0 and chunk["bytes_in"] > 100_000
    assert chunk["msg"].startswith("POST /api/infer_stream_chunk 200 ")
    assert any(line["path"].startswith("/api/infer_stream_close/") and line["session_id"] == sid for line in access)
    refused = next(line for line in access if line["status"] == 422 and line["path"] == "/api/infer_stream_init")
    assert "id_idx must be between" in refused["error"]
    assert not [line for line in lines if line["level"] in ("warning", "error")]  # start-up to shutdown, nothing spurious
