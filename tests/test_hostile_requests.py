"""Hostile and unlucky requests against the app in-process: the access
policy, internal errors that say only a request id, NaN that cannot get out,
short audio, strict field types, per-client caps, and a chunk whose client
hangs up: applied to its session whole or not at all."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from sanic_testing.testing import SanicASGITestClient

from a2e import streaming
from batching import Cancelled, CancelScope, MicroBatcher
from engine.service import InferenceService
from server.turns import Turn
from tests.conftest import speech_like, wav_bytes
from tests.test_server import make_app


@pytest.fixture(scope="module")
def served(checkpoint, config_file):
    app, service = make_app(checkpoint, config_file, max_sessions_per_client=3, max_sessions=50)
    yield app, service
    service.close()


@pytest.fixture
def client(served):
    return SanicASGITestClient(served[0])


def chunk_body(sid, audio):
    return dict(data={"session_id": sid}, files={"audio_chunk": ("c.wav", wav_bytes(audio))})


# -- access policy -----------------------------------------------------------------


async def test_every_response_says_nosniff_and_its_request_id(client):
    for path in ("/api/health", "/api/nothing", "/"):
        _, res = await client.get(path)
        assert res.headers["x-content-type-options"] == "nosniff"
        assert res.headers["x-request-id"]


async def test_cross_origin_requests_are_refused_unless_allowed(checkpoint, config_file):
    app, service = make_app(checkpoint, config_file, cors_origins="https://app.example")
    client = SanicASGITestClient(app)
    try:
        wav = wav_bytes(speech_like(0.5))
        _, res = await client.post("/api/infer", files={"audio_file": ("a.wav", wav)}, headers={"Origin": "https://evil.example"})
        assert res.status == 403 and "--cors-origins" in res.json["detail"]
        _, res = await client.post("/api/infer", files={"audio_file": ("a.wav", wav)}, headers={"Origin": "https://app.example"})
        assert res.status == 200 and res.headers["access-control-allow-origin"] == "https://app.example"
        _, res = await client.options(
            "/api/infer", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
        )
        assert res.status == 204 and "POST" in res.headers["access-control-allow-methods"]
        _, res = await client.get("/api/health")  # no Origin: not a browser, not cross-origin
        assert res.status == 200 and "access-control-allow-origin" not in res.headers
    finally:
        service.close()


async def test_cors_is_off_by_default(client):
    _, res = await client.post("/api/infer_stream_init", json={}, headers={"Origin": "https://any.example"})
    assert res.status == 403


async def test_api_key_guards_all_but_health_metrics_and_the_demo_page(checkpoint, config_file):
    app, service = make_app(checkpoint, config_file, api_key="s3cret")
    client = SanicASGITestClient(app)
    try:
        _, res = await client.post("/api/infer_stream_init", json={})
        assert res.status == 401 and "API key" in res.json["detail"]
        _, res = await client.post("/api/infer_stream_init", json={}, headers={"X-API-Key": "wrong"})
        assert res.status == 401
        _, res = await client.post("/api/infer_stream_init", json={}, headers={"X-API-Key": "s3cret"})
        assert res.status == 200
        _, res = await client.post("/api/infer_stream_init", json={}, headers={"Authorization": "Bearer s3cret"})
        assert res.status == 200
        for path in ("/api/health", "/metrics", "/demo", "/demo/demo.js"):
            _, res = await client.get(path)
            assert res.status == 200
    finally:
        service.close()


async def test_health_shows_file_names_not_paths(client, served):
    _, res = await client.get("/api/health")
    weights = res.json["model"]["weights"]
    assert "/" not in weights and weights.endswith(".tar")
    limits = res.json["limits"]
    assert limits["max_audio_s"] <= limits["configured_max_audio_s"] and limits["model_audio_s_per_s"] > 0


# -- our faults and the client's ------------------------------------------------------


async def test_an_internal_error_says_only_internal_error_and_a_request_id(served, client, monkeypatch, caplog):
    _, service = served

    def broken(*args, **kwargs):
        raise KeyError("secret internal detail")

    monkeypatch.setattr("a2e.clip.infer_clip", broken)
    _, res = await client.post("/api/infer", files={"audio_file": ("a.wav", wav_bytes(speech_like(0.5)))})
    assert res.status == 500
    detail = res.json["detail"]
    assert "secret" not in detail and "KeyError" not in detail
    request_id = res.headers["x-request-id"]
    assert request_id in detail and request_id in caplog.text and "secret internal detail" in caplog.text


@pytest.mark.parametrize("n", [1, 50, 257, 320, 399])
async def test_any_length_from_one_sample_animates(client, n):
    _, res = await client.post("/api/infer", files={"audio_file": ("a.wav", wav_bytes(np.full(n, 0.2, np.float32)))})
    assert res.status == 200, res.text
    assert res.json["metadata"]["frame_count"] == len(res.json["frames"]) == 1


async def test_absurd_amplitudes_are_400_and_do_not_poison_the_session(client):
    _, res = await client.post("/api/infer", files={"audio_file": ("a.wav", wav_bytes(np.full(16000, 1e25, np.float32), subtype="FLOAT"))})
    assert res.status == 400 and "amplitude" in res.json["detail"]
    _, res = await client.post("/api/infer_stream_init", json={"seed": 5})
    sid = res.json["session_id"]
    bomb = np.full(16000, 1e30, np.float32)
    _, res = await client.post("/api/infer_stream_chunk", data={"session_id": sid}, files={"audio_chunk": ("c.wav", wav_bytes(bomb, subtype="FLOAT"))})
    assert res.status == 400
    _, res = await client.post("/api/infer_stream_chunk", **chunk_body(sid, speech_like(1.0)))
    assert res.status == 200 and res.json["metadata"]["chunk_index"] == 1
    assert np.isfinite(np.array([f["weights"] for f in res.json["frames"]])).all()


@pytest.mark.parametrize("field,value", [("context_mode", []), ("context_mode", 1), ("loudness", ["off"]), ("id_idx", "x")])
async def test_json_fields_have_strict_types(client, field, value):
    _, res = await client.post("/api/infer_stream_init", json={field: value})
    assert res.status == 422 and field in res.json["detail"]


async def test_one_client_cannot_hold_every_session(checkpoint, config_file):
    app, service = make_app(checkpoint, config_file, max_sessions_per_client=3, max_sessions=50)
    client = SanicASGITestClient(app)
    try:
        sids = []
        for _ in range(3):
            _, res = await client.post("/api/infer_stream_init", json={})
            assert res.status == 200
            sids.append(res.json["session_id"])
        _, res = await client.post("/api/infer_stream_init", json={})
        assert res.status == 429 and "per client" in res.json["detail"]
        for sid in sids:
            await client.delete(f"/api/infer_stream_close/{sid}")
        _, res = await client.post("/api/infer_stream_init", json={})
        assert res.status == 200
    finally:
        service.close()


# -- a chunk is applied whole or not at all -----------------------------------------


def stalled(service: InferenceService, gate: threading.Event):
    run = service.batcher.runner.run_windows

    def slow(*args):
        gate.wait(10)
        return run(*args)

    return slow


async def as_if_never_sent(service: InferenceService, seed: int, first, last):
    """A reference session fed ``first`` then ``last``: what a session whose
    middle chunk was dropped must answer for ``last``. Returns (its id, that answer)."""
    ref = (await service.open_session(0, seed, "continuous")).session_id
    await service.stream_chunk(ref, first)
    return ref, await service.stream_chunk(ref, last)


async def test_a_chunk_whose_client_hangs_up_leaves_no_trace(served):
    _, service = served
    a, b, c = (speech_like(0.7, seed=s) for s in (1, 2, 3))
    ref, want = await as_if_never_sent(service, 11, a, c)

    session = (await service.open_session(0, 11, "continuous")).session_id
    await service.stream_chunk(session, a)
    gate = threading.Event()
    original = service.batcher.runner.run_windows
    service.batcher.runner.run_windows = stalled(service, gate)
    try:
        dropped = asyncio.ensure_future(service.stream_chunk(session, b))
        await asyncio.sleep(0.3)  # planned and queued, the model is busy with it
        dropped.cancel()  # the client hangs up
        with pytest.raises(asyncio.CancelledError):
            await dropped
    finally:
        gate.set()
        service.batcher.runner.run_windows = original
    got = await service.stream_chunk(session, c)
    assert got.chunk_index == 2 == want.chunk_index
    assert np.array_equal(got.frames, want.frames)  # as if chunk b was never sent
    assert got.start_time == want.start_time
    for sid in (ref, session):
        await service.close_session(sid)


async def test_a_chunk_cancelled_while_waiting_its_turn_does_not_block_the_next(served):
    _, service = served
    a, b, c = (speech_like(0.7, seed=s) for s in (4, 5, 6))
    ref, want = await as_if_never_sent(service, 12, a, c)

    session = (await service.open_session(0, 12, "continuous")).session_id
    gate = threading.Event()
    original = service.batcher.runner.run_windows
    service.batcher.runner.run_windows = stalled(service, gate)
    try:
        first = asyncio.ensure_future(service.stream_chunk(session, a))
        await asyncio.sleep(0.2)  # a is at the model; b and c wait behind it
        second = asyncio.ensure_future(service.stream_chunk(session, b))
        third = asyncio.ensure_future(service.stream_chunk(session, c))
        await asyncio.sleep(0.05)
        second.cancel()  # b's client hangs up while b waits
        await asyncio.sleep(0.05)
    finally:
        gate.set()
    service.batcher.runner.run_windows = original
    results = await asyncio.wait_for(asyncio.gather(first, second, third, return_exceptions=True), 5)
    assert isinstance(results[1], asyncio.CancelledError)
    assert results[2].chunk_index == 2 == want.chunk_index
    assert np.array_equal(results[2].frames, want.frames)  # as if b was never sent
    assert service.sessions.get(session).in_flight == 0
    for sid in (ref, session):
        await service.close_session(sid)


async def test_a_worker_turn_cancelled_while_waiting_does_not_block_the_next():
    loop = asyncio.get_running_loop()
    f1, f2, f3 = (loop.create_future() for _ in range(3))
    first, second, third = Turn(None, f1), Turn(f1, f2), Turn(f2, f3)
    order = []

    async def take(turn, name, hold=0.0):
        async with turn:
            order.append(name)
            await asyncio.sleep(hold)

    t1 = asyncio.ensure_future(take(first, "first", 0.2))
    t2 = asyncio.ensure_future(take(second, "second"))
    t3 = asyncio.ensure_future(take(third, "third"))
    await asyncio.sleep(0.05)
    t2.cancel()
    await asyncio.wait_for(asyncio.gather(t1, t3, t2, return_exceptions=True), 2)
    assert order == ["first", "third"] and f3.done()


# -- work nobody waits for -------------------------------------------------------------


class SlowRunner:
    num_identities = 1

    def __init__(self, per_window_s):
        self.per_window_s = per_window_s
        self.calls = 0

    def run_windows(self, windows, identities):
        self.calls += 1
        time.sleep(self.per_window_s * len(windows))
        return np.zeros((len(windows), 64, 52), dtype=np.float32)

    def run_clip(self, audio, identity):
        return np.zeros((1, 52), dtype=np.float32)


def test_a_cancelled_scope_drops_its_queued_work():
    runner = SlowRunner(0.2)
    batcher = MicroBatcher(runner, max_batch=1, max_wait_s=0).start()
    try:
        window = np.zeros((1, streaming.WINDOW_SAMPLES), np.float32)
        busy = batcher.submit_windows(window, [0])  # occupies the device
        scope = CancelScope(batcher)
        errors = []

        def long_clip():
            try:
                for _ in range(10):
                    scope.run_windows(window, [0])
            except Cancelled as exc:
                errors.append(exc)

        thread = threading.Thread(target=long_clip)
        thread.start()
        time.sleep(0.05)
        scope.cancel()
        thread.join(2)
        busy.result(2)
        time.sleep(0.3)
        assert errors and runner.calls == 1  # only the job already on the device ran
    finally:
        batcher.stop()


def test_queue_refuses_work_beyond_its_time_budget():
    runner = SlowRunner(0.1)
    batcher = MicroBatcher(runner, max_batch=1, max_wait_s=0, max_queue_wait_s=0.25).start()
    try:
        window = np.zeros((1, streaming.WINDOW_SAMPLES), np.float32)
        batcher.submit_windows(window, [0]).result(2)  # learns the batch time (0.1 s)
        accepted, refused = 0, 0
        for _ in range(10):
            try:
                batcher.submit_windows(window, [0])
                accepted += 1
            except Exception as exc:
                assert "queue is full" in str(exc)
                refused += 1
        assert refused > 0 and accepted <= 5
    finally:
        batcher.stop()


def test_length_limits_follow_the_model_speed(checkpoint, config_file):
    from batching import ModelRunner
    from engine.loading import effective_limits

    app, service = make_app(checkpoint, config_file, response_timeout_s=2.0, max_batch=2)
    try:
        runner = service.batcher.runner
        slow = SlowRunner(0.05)
        slow.num_identities = runner.num_identities
        limits = effective_limits(service.settings, slow)  # 20 s of audio per second, 1 s of budget
        assert 10 <= limits.max_audio_s <= 20 and limits.max_chunk_s == service.settings.max_chunk_s
        assert isinstance(runner, ModelRunner)
    finally:
        service.close()
