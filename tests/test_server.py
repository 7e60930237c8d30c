"""The HTTP API against the real Sanic app (sanic-testing), with a random-weight
checkpoint in the released key layout that the tests create."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import REGISTRY
from sanic_testing.testing import SanicASGITestClient

from app import create_app
from engine.service import InferenceService
from runtime.settings import Settings
from tests.conftest import ENGLISH, MP3_AS_WAV, speech_like, wav_bytes


def make_app(checkpoint, config_file, **overrides):
    overrides.setdefault("separation_model_dir", str(config_file.parent))  # no Demucs model there: offline, fast
    settings = Settings(config_file=str(config_file), weight=str(checkpoint), **overrides).validate()
    service = InferenceService(settings)
    service.load()
    return create_app(settings, service), service


@pytest.fixture(scope="module")
def served(checkpoint, config_file):
    app, service = make_app(checkpoint, config_file, max_sessions=50, max_audio_s=30, max_upload_mb=2)
    yield app
    service.close()


@pytest.fixture
def client(served):
    return SanicASGITestClient(served)



async def health_ok(client):
    _, res = await client.get("/api/health")
    assert res.status == 200 and res.json["status"] == "healthy"


def one_second_wav(seed=0):
    return wav_bytes(speech_like(1.0, seed=seed))


# -- the document's endpoints ------------------------------------------------------


async def test_root_lists_endpoints(client):
    _, res = await client.get("/")
    assert res.status == 200
    assert res.json["service"] == "LAM-A2E API" and res.json["version"] == "1.0.0"
    assert res.json["endpoints"]["infer"] == "/api/infer"


async def test_health_has_the_document_fields(client):
    _, res = await client.get("/api/health")
    body = res.json
    assert body["status"] == "healthy" and body["model_loaded"] is True
    assert isinstance(body["gpu_available"], bool) and isinstance(body["sessions"], int)
    assert body["model"]["num_identities"] == 12 and body["model"]["device"] == "cpu"


async def test_infer_whole_clip(client):
    audio = ENGLISH.read_bytes()
    _, res = await client.post(
        "/api/infer",
        files={"audio_file": ("speech.wav", audio)},
        data={"id_idx": "3", "ex_vol": "False", "movement_smooth": "True", "brow_movement": "true"},
    )
    assert res.status == 200, res.text
    body = res.json
    assert len(body["names"]) == 52 and body["names"][24] == "jawOpen"
    meta = body["metadata"]
    assert meta["fps"] == 30.0 and meta["blendshape_count"] == 52
    assert meta["frame_count"] == len(body["frames"]) == 240
    assert meta["inference_time"] > 0
    frame = body["frames"][1]
    assert len(frame["weights"]) == 52 and frame["rotation"] == []
    assert frame["time"] == pytest.approx(1 / 30)
    weights = np.array([f["weights"] for f in body["frames"]])
    assert weights.min() >= 0 and weights.max() <= 1


async def test_infer_seed_makes_blinks_reproducible(client):
    audio = wav_bytes(speech_like(6.0))
    bodies = []
    for _ in range(2):
        _, res = await client.post("/api/infer", files={"audio_file": ("a.wav", audio)}, data={"seed": "7"})
        bodies.append(np.array([f["weights"] for f in res.json["frames"]]))
    assert np.array_equal(bodies[0], bodies[1])
    assert bodies[0][:, 8].max() > 0.5  # it blinked


async def test_mp3_named_wav(client):
    _, res = await client.post("/api/infer", files={"audio_file": ("x.wav", MP3_AS_WAV.read_bytes())})
    assert res.status == 200
    assert res.json["metadata"]["frame_count"] in (183, 184)  # 6.12 s


async def test_streaming_session_lifecycle(client):
    _, res = await client.post("/api/infer_stream_init", json={"id_idx": 2})
    assert res.status == 200
    sid = res.json["session_id"]
    assert res.json["message"] == "Streaming session initialized" and res.json["id_idx"] == 2
    for i in range(1, 4):
        _, res = await client.post(
            "/api/infer_stream_chunk", data={"session_id": sid}, files={"audio_chunk": ("c.wav", one_second_wav(i))}
        )
        assert res.status == 200, res.text
        meta = res.json["metadata"]
        assert meta["session_id"] == sid and meta["chunk_index"] == i
        assert meta["frame_count"] == 30 and len(res.json["frames"]) == 30
        assert res.json["frames"][0]["time"] == 0.0  # relative to the chunk
        assert meta["chunk_start_time"] == pytest.approx((i - 1) * 1.0)
    _, res = await client.get("/api/health")
    assert res.json["sessions"] >= 1
    _, res = await client.delete(f"/api/infer_stream_close/{sid}")
    assert res.status == 200 and res.json == {"message": "Session closed", "session_id": sid, "chunks_processed": 3}
    _, res = await client.delete(f"/api/infer_stream_close/{sid}")
    assert res.status == 404
    _, res = await client.post(
        "/api/infer_stream_chunk", data={"session_id": sid}, files={"audio_chunk": ("c.wav", one_second_wav())}
    )
    assert res.status == 404


async def test_long_chunk_returns_all_its_frames(client):
    _, res = await client.post("/api/infer_stream_init", json={})
    sid = res.json["session_id"]
    _, res = await client.post(
        "/api/infer_stream_chunk", data={"session_id": sid}, files={"audio_chunk": ("c.wav", ENGLISH.read_bytes())}
    )
    assert res.status == 200
    assert res.json["metadata"]["frame_count"] == 240


async def test_concurrent_chunks_of_a_session_keep_arrival_order(served, checkpoint, config_file):
    client = SanicASGITestClient(served)
    _, res = await client.post("/api/infer_stream_init", json={"id_idx": 0, "seed": 1})
    sid = res.json["session_id"]
    chunks = [one_second_wav(i) for i in range(5)]
    # Sequential reference on a second session with the same seed
    _, res = await client.post("/api/infer_stream_init", json={"id_idx": 0, "seed": 1})
    ref_sid = res.json["session_id"]
    want = []
    for c in chunks:
        _, res = await client.post("/api/infer_stream_chunk", data={"session_id": ref_sid}, files={"audio_chunk": ("c.wav", c)})
        want.append(res.json)

    async def send(c):
        return await client.post("/api/infer_stream_chunk", data={"session_id": sid}, files={"audio_chunk": ("c.wav", c)})

    # started in order, awaited together: the server must keep the order
    tasks = []
    for c in chunks:
        tasks.append(asyncio.ensure_future(send(c)))
        await asyncio.sleep(0)
    results = [r for _, r in await asyncio.gather(*tasks)]
    assert [r.json["metadata"]["chunk_index"] for r in results] == [1, 2, 3, 4, 5]
    for got, ref in zip(results, want):
        a = np.array([f["weights"] for f in got.json["frames"]])
        b = np.array([f["weights"] for f in ref["frames"]])
        assert np.allclose(a, b, atol=1e-6)


async def test_reference_context_mode(client):
    _, res = await client.post("/api/infer_stream_init", json={"context_mode": "reference", "seed": 3})
    assert res.status == 200 and res.json["context_mode"] == "reference"
    _, res = await client.post(
        "/api/infer_stream_chunk", data={"session_id": res.json["session_id"]}, files={"audio_chunk": ("c.wav", one_second_wav())}
    )
    assert res.json["metadata"]["context_mode"] == "reference"


# -- client mistakes: a clear 4xx, and the server keeps serving ------------------------

BAD_INFER = [
    ({"audio_file": ("a.txt", b"This is not an audio file")}, {}, 400, "Invalid audio"),
    ({"audio_file": ("a.wav", b"")}, {}, 400, "empty"),
    ({"audio_file": ("a.wav", wav_bytes(np.zeros(0, np.float32)))}, {}, 400, "no samples"),
    ({"audio_file": ("a.wav", wav_bytes(np.full(100, np.nan, np.float32), subtype="FLOAT"))}, {}, 400, "non-finite"),
    ({"audio_file": ("a.wav", wav_bytes(np.zeros(16000 * 31, np.int16), subtype="PCM_16"))}, {}, 413, "limit is 30 s"),
    ({"audio_file": ("a.wav", wav_bytes(np.zeros(16000 * 40, np.float32), subtype="FLOAT"))}, {}, 413, "too large"),
    ({"audio_file": ("a.wav", wav_bytes(speech_like(1)))}, {"id_idx": "12"}, 422, "between 0 and 11"),
    ({"audio_file": ("a.wav", wav_bytes(speech_like(1)))}, {"id_idx": "-1"}, 422, "between 0 and 11"),
    ({"audio_file": ("a.wav", wav_bytes(speech_like(1)))}, {"id_idx": "two"}, 422, "integer"),
    ({"audio_file": ("a.wav", wav_bytes(speech_like(1)))}, {"movement_smooth": "maybe"}, 422, "boolean"),
    ({}, {"id_idx": "0"}, 422, "missing file field 'audio_file'"),
    ({"audio_file": ("a.wav", wav_bytes(speech_like(1)))}, {"ex_vol": "true"}, 503, "vocal isolation"),
    ({"audio_file": ("a.wav", wav_bytes(speech_like(1)))}, {"loudness": "loud"}, 422, "loudness"),
]


@pytest.mark.parametrize("files,data,status,detail", BAD_INFER)
async def test_infer_rejects_bad_input(client, files, data, status, detail):
    _, res = await client.post("/api/infer", files=files or None, data=data)
    assert res.status == status, res.text
    assert detail in res.json["detail"]
    await health_ok(client)


async def test_infer_without_multipart(client):
    _, res = await client.post("/api/infer", content=b"raw", headers={"content-type": "application/octet-stream"})
    assert res.status == 422 and "multipart" in res.json["detail"]
    await health_ok(client)


async def test_stream_chunk_rejects_bad_input(client):
    _, res = await client.post("/api/infer_stream_init", json={"id_idx": 0})
    sid = res.json["session_id"]
    cases = [
        ({"session_id": sid}, {"audio_chunk": ("c.wav", wav_bytes(np.zeros(0, np.float32)))}, 400, "no samples"),
        ({"session_id": sid}, {"audio_chunk": ("c.wav", b"garbage")}, 400, "Invalid audio"),
        ({}, {"audio_chunk": ("c.wav", one_second_wav())}, 422, "session_id"),
        ({"session_id": sid}, None, 422, "audio_chunk"),
        ({"session_id": "00000000-0000-0000-0000-000000000000"}, {"audio_chunk": ("c.wav", one_second_wav())}, 404, "not found"),
    ]
    for data, files, status, detail in cases:
        _, res = await client.post("/api/infer_stream_chunk", data=data, files=files)
        assert res.status == status, (data, res.text)
        assert detail in res.json["detail"]
    # the session survived every mistake: its first good chunk is chunk 1
    _, res = await client.post(
        "/api/infer_stream_chunk", data={"session_id": sid}, files={"audio_chunk": ("c.wav", one_second_wav())}
    )
    assert res.status == 200 and res.json["metadata"]["chunk_index"] == 1


@pytest.mark.parametrize(
    "body,detail",
    [
        ({"id_idx": 99}, "between 0 and 11"),
        ({"id_idx": "abc"}, "integer"),
        ({"id_idx": True}, "integer"),
        ({"id_idx": 1.5}, "integer"),
        ({"context_mode": "sideways"}, "context_mode"),
        ({"seed": -4}, "seed"),
        ([1, 2], "JSON object"),
    ],
)
async def test_stream_init_rejects_bad_fields(client, body, detail):
    _, res = await client.post("/api/infer_stream_init", json=body)
    assert res.status == 422 and detail in res.json["detail"]
    await health_ok(client)


async def test_stream_init_invalid_json_and_empty_body(client):
    _, res = await client.post("/api/infer_stream_init", content=b"{not json", headers={"content-type": "application/json"})
    assert res.status == 422 and "JSON" in res.json["detail"]
    _, res = await client.post("/api/infer_stream_init")
    assert res.status == 200 and res.json["id_idx"] == 0


async def test_unknown_route_is_json_404(client):
    _, res = await client.get("/api/nothing")
    assert res.status == 404 and "detail" in res.json


# -- limits, readiness and metrics --------------------------------------------------------


async def test_session_cap_and_idle_expiry(checkpoint, config_file):
    app, service = make_app(checkpoint, config_file, max_sessions=2, session_idle_timeout_s=0.2)
    client = SanicASGITestClient(app)
    try:
        ids = []
        for _ in range(2):
            _, res = await client.post("/api/infer_stream_init", json={})
            ids.append(res.json["session_id"])
        _, res = await client.post("/api/infer_stream_init", json={})
        assert res.status == 429 and "limit of 2" in res.json["detail"] and res.headers["retry-after"]
        await asyncio.sleep(0.3)
        before = REGISTRY.get_sample_value("a2e_sessions_expired_total", {"engine": "0"}) or 0
        assert service.expire_sessions() == 2
        assert REGISTRY.get_sample_value("a2e_sessions_expired_total", {"engine": "0"}) == before + 2
        assert REGISTRY.get_sample_value("a2e_sessions_active", {"engine": "0"}) == 0
        _, res = await client.post(
            "/api/infer_stream_chunk", data={"session_id": ids[0]}, files={"audio_chunk": ("c.wav", one_second_wav())}
        )
        assert res.status == 404
        _, res = await client.post("/api/infer_stream_init", json={})
        assert res.status == 200
    finally:
        service.close()


async def test_not_ready_without_weights(tmp_path, config_file):
    # the config file names weights that are not there (as the shipped config does before the download)
    settings = Settings(config_file=str(config_file), model="lam").validate()
    service = InferenceService(settings)
    service.load()
    client = SanicASGITestClient(create_app(settings, service))
    _, res = await client.get("/api/health")
    assert res.status == 200 and res.json["status"] == "not_ready" and res.json["model_loaded"] is False
    _, res = await client.post("/api/infer", files={"audio_file": ("a.wav", one_second_wav())})
    assert res.status == 503 and "Model not loaded" in res.json["detail"]
    assert "--weight hf://3DAIGC/LAM_audio2exp" in res.json["detail"]  # the way to the released model
    _, res = await client.post("/api/infer_stream_init", json={})
    assert res.status == 503
    _, res = await client.post("/api/infer_stream_chunk", data={"session_id": "x"}, files={"audio_chunk": ("c.wav", one_second_wav())})
    assert res.status == 503


async def test_queue_full_is_503_with_retry_after(checkpoint, config_file):
    app, service = make_app(checkpoint, config_file, max_queue=1, max_batch=1)
    client = SanicASGITestClient(app)
    try:
        service.batcher.runner.run_windows = _stall(service.batcher.runner.run_windows)
        sids = []
        for _ in range(4):
            _, res = await client.post("/api/infer_stream_init", json={"seed": 3})
            sids.append(res.json["session_id"])

        async def chunk(sid):
            return await client.post(
                "/api/infer_stream_chunk", data={"session_id": sid}, files={"audio_chunk": ("c.wav", one_second_wav())}
            )

        results = [r for _, r in await asyncio.gather(*(chunk(sid) for sid in sids))]
        statuses = sorted(r.status for r in results)
        assert 200 in statuses and 503 in statuses
        full = next(r for r in results if r.status == 503)
        assert "queue is full" in full.json["detail"] and int(full.headers["retry-after"]) >= 1
        # a refused chunk took no index and changed nothing: sent again, it is chunk 1 with the same frames
        served = next(r for r in results if r.status == 200)
        refused = sids[results.index(full)]
        _, again = await chunk(refused)
        assert again.status == 200 and again.json["metadata"]["chunk_index"] == 1
        assert again.json["frames"] == served.json["frames"]
    finally:
        service.close()


def _stall(fn):
    import time

    def slow(*args):
        time.sleep(0.3)
        return fn(*args)

    return slow


async def test_metrics_endpoint(client):
    await client.get("/api/health")
    _, res = await client.get("/metrics")
    assert res.status == 200
    text = res.text
    for name in (
        "a2e_http_requests_total",
        "a2e_http_request_duration_seconds_bucket",
        "a2e_queue_windows",
        "a2e_batch_run_seconds_bucket",
        "a2e_batch_windows_bucket",
        "a2e_sessions_active",
        "a2e_audio_seconds_total",
        "a2e_frames_total",
    ):
        assert name in text, name
    assert 'endpoint="/api/health"' in text


async def test_long_clip_runs_in_windows_beside_streams(checkpoint, config_file):
    """A clip past single_pass_max_s goes through the batcher as windows while
    streaming sessions keep being served."""
    app, service = make_app(checkpoint, config_file, single_pass_max_s=2)
    client = SanicASGITestClient(app)
    try:
        _, res = await client.post("/api/infer_stream_init", json={})
        sid = res.json["session_id"]
        stereo_44k = wav_bytes(np.stack([speech_like(1.0, 44100), speech_like(1.0, 44100, seed=1)], 1), 44100)

        async def chunk():
            return await client.post(
                "/api/infer_stream_chunk", data={"session_id": sid}, files={"audio_chunk": ("c.wav", stereo_44k)}
            )

        clip_req = client.post("/api/infer", files={"audio_file": ("long.wav", wav_bytes(speech_like(12.0)))})
        results = await asyncio.gather(clip_req, chunk(), chunk())
        clip_res, c1, c2 = (r for _, r in results)
        assert clip_res.status == 200 and clip_res.json["metadata"]["frame_count"] == 360
        assert sorted([c1.json["metadata"]["chunk_index"], c2.json["metadata"]["chunk_index"]]) == [1, 2]
        assert c1.json["metadata"]["frame_count"] == 30  # 1 s at 44.1 kHz stereo
        assert REGISTRY.get_sample_value("a2e_batch_windows_count", {"engine": "0"}) > 0
    finally:
        service.close()


@pytest.mark.parametrize("model", ["auto", "a2e-lite"])
async def test_a2e_lite_is_used_without_lam_weights(tmp_path, config_file, model):
    settings = Settings(config_file=str(config_file), model=model).validate()
    service = InferenceService(settings)
    service.load()
    client = SanicASGITestClient(create_app(settings, service))
    try:
        _, res = await client.get("/api/health")
        assert res.json["status"] == "healthy" and res.json["model"]["name"] == "a2e-lite"
        _, res = await client.post("/api/infer", files={"audio_file": ("a.wav", ENGLISH.read_bytes())})
        assert res.status == 200 and res.json["metadata"]["frame_count"] == 240
        weights = np.array([f["weights"] for f in res.json["frames"]])
        assert weights[:, res.json["names"].index("jawOpen")].std() > 0.01
    finally:
        service.close()


async def test_explicit_lam_wins_over_a2e_lite(checkpoint, config_file):
    settings = Settings(config_file=str(config_file), weight=str(checkpoint), model="auto").validate()
    service = InferenceService(settings)
    service.load()
    try:
        assert service.model_info.name == "lam-a2e"
    finally:
        service.close()
