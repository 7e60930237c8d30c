"""One check of credentials on every door: REST, WebSocket (headers, or the
subprotocol a browser can send) and gRPC (metadata), keys per client from a
file re-read when it changes, session limits per key (across a cluster
with Redis), revocation ending open streams, and keys never shown."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import requests
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from a2e.errors import ConfigError
from server.api_keys import KeyRing, digest, parse_keys
from server.credentials import Caller, Credentials, Unauthenticated
from tests.conftest import speech_like
from tests.test_end_to_end import free_port, stop, wait_until_healthy

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"alice": "alice-key-0123456789abcdef", "bob": "bob-key-0123456789abcdef"}
SINGLE = "s3cret-single"


def keys_text(names) -> str:
    return "# name  digest\n" + "".join(f"{n} sha256:{digest(KEYS[n]).hex()}  # {n}'s\n" for n in names)


# -- the check itself ------------------------------------------------------------------------


def test_a_keys_file_names_the_line_that_is_wrong(tmp_path):
    assert parse_keys(keys_text(["alice", "bob"]), "k") == {digest(KEYS["alice"]): "alice", digest(KEYS["bob"]): "bob"}
    for text, said in [
        ("alice\n", "line 1: expected 'NAME sha256"),
        ("alice sha256:abc\n", "line 1"),
        (keys_text(["alice"]) + f"alice sha256:{'0' * 64}\n", "line 3: the name 'alice' is used twice"),
        (keys_text(["alice"]) + f"carol sha256:{digest(KEYS['alice']).hex()}\n", "the same key as 'alice'"),
        (f"bad/name sha256:{'0' * 64}\n", "a name is"),
    ]:
        with pytest.raises(ConfigError, match=said):
            parse_keys(text, "k")
    with pytest.raises(ConfigError, match="cannot read the keys file"):
        KeyRing(str(tmp_path / "missing.keys"))


def test_a_changed_keys_file_is_read_again_and_a_broken_one_keeps_the_keys(tmp_path):
    path = tmp_path / "k.keys"
    path.write_text(keys_text(["alice", "bob"]))
    ring = KeyRing(str(path))
    creds = Credentials(None, ring, False)
    bob = creds.identify(KEYS["bob"], None, "10.0.0.1")
    assert bob == Caller("bob", "key:bob", 0)
    path.write_text("this is not a keys file\n")
    assert not ring.refresh() and ring.name_of(KEYS["bob"]) == "bob"  # half-written: nothing changes
    path.write_text(keys_text(["alice"]))
    assert ring.refresh() and ring.generation == 1
    with pytest.raises(Unauthenticated, match="wrong or revoked"):
        creds.identify(KEYS["bob"], None, "10.0.0.1")
    with pytest.raises(Unauthenticated, match="was revoked"):
        creds.recheck(bob)
    alice = creds.identify(KEYS["alice"], None, "10.0.0.1")
    assert creds.recheck(alice) is alice


def test_who_is_asked_for_what():
    none = Credentials(None, None, False)
    assert not none.required and none.identify(None, None, "1.2.3.4") == Caller(None, "1.2.3.4")
    single = Credentials(SINGLE, None, False)
    # One key for everyone is no client's own: limits still count per address.
    assert single.identify(SINGLE, None, "1.2.3.4") == Caller("api-key", "1.2.3.4")
    with pytest.raises(Unauthenticated, match="missing API key"):
        single.identify(None, "alice", "1.2.3.4")  # a certificate is not a key unless the operator says so
    certs = Credentials(SINGLE, None, True)
    assert certs.identify(None, "alice", "1.2.3.4") == Caller("cert:alice", "cert:alice")
    assert certs.identify(SINGLE, "alice", "1.2.3.4").name == "api-key"
    with pytest.raises(Unauthenticated):
        certs.identify("wrong", "alice", "1.2.3.4")  # a wrong key is refused, certificate or not


# -- a server with keys per client ----------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    d = tmp_path_factory.mktemp("keyed")
    keys = d / "clients.keys"
    keys.write_text(keys_text(["alice", "bob"]))
    log = d / "server.log"
    port, grpc_port = free_port(), free_port()
    env = dict(os.environ, A2E_LOG_LEVEL="info")
    cmd = [sys.executable, "app.py", "--model", "a2e-lite", "--host", "127.0.0.1", "--port", str(port),
           "--grpc-port", str(grpc_port), "--api-keys-file", str(keys), "--api-key", SINGLE,
           "--max-sessions-per-client", "2", "--stream-hop-s", "0.5"]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_until_healthy(proc, port)
        yield {"url": f"http://127.0.0.1:{port}", "grpc": f"127.0.0.1:{grpc_port}", "keys": keys, "log": log}
    finally:
        stop(proc)


def app_routes():
    """The server's own route table (an app made from the same settings, never served)."""
    from app import create_app
    from engine.service import InferenceService
    from runtime.settings import load_settings

    settings = load_settings(["--model", "stub", "--api-key", SINGLE], environ={})
    service = InferenceService(settings)
    app = create_app(settings, service)
    try:
        return [(r.path, sorted(r.methods), bool(r.extra.websocket)) for r in app.router.routes]
    finally:
        service.close()


def grpc_methods():
    """Every method of every service in the server's .proto files, and the health service's."""
    from google.protobuf import descriptor_pool
    from grpc_health.v1 import health_pb2

    from server.ace_grpc import protocol

    pool = descriptor_pool.Default()
    names = [str(p.relative_to(protocol.PROTO_ROOT)) for p in protocol.PROTO_ROOT.rglob("*.proto")] + [health_pb2.DESCRIPTOR.name]
    out = []
    for name in names:
        for service in pool.FindFileByName(name).services_by_name.values():
            for method in service.methods:
                out.append((service.full_name, method.name, method.client_streaming, method.server_streaming))
    return out


def test_every_door_refuses_a_request_without_a_key(keyed):
    url = keyed["url"]
    open_paths = {"/api/health", "/metrics", "/openapi.json", "/docs"}
    routes = app_routes()
    assert any(ws for _, _, ws in routes) and len(routes) >= 10
    for path, methods, websocket in routes:
        concrete = "/" + path.lstrip("/")
        concrete = concrete.split("<")[0] + "x" if "<" in concrete else concrete
        if websocket:
            with pytest.raises(InvalidStatus) as refused:
                connect(url.replace("http", "ws") + concrete, open_timeout=5).close()
            assert refused.value.response.status_code == 401, concrete
            continue
        for method in methods:
            if method in ("OPTIONS", "HEAD"):
                continue
            res = requests.request(method, url + concrete, timeout=10)
            if concrete in open_paths or concrete.startswith("/demo"):
                assert res.status_code != 401, (method, concrete)
            else:
                assert res.status_code == 401, (method, concrete, res.status_code)
                assert "X-API-Key" in res.json()["detail"] and res.headers["WWW-Authenticate"].startswith("Bearer")
    methods = grpc_methods()
    assert any(s.endswith("A2FControllerService") for s, *_ in methods)
    with grpc.insecure_channel(keyed["grpc"]) as channel:
        for service, name, client_streaming, server_streaming in methods:
            kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                    (True, False): channel.stream_unary, (True, True): channel.stream_stream}[(client_streaming, server_streaming)]  # fmt: skip
            call = kind(f"/{service}/{name}", request_serializer=lambda m: m, response_deserializer=lambda m: m)
            request = iter([b""]) if client_streaming else b""
            try:
                answer = call(request, timeout=10)
                list(answer) if server_streaming else answer
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code, detail = exc.code(), exc.details()
            if service == "grpc.health.v1.Health":
                assert code != grpc.StatusCode.UNAUTHENTICATED, name  # open, as /api/health is
            else:
                assert code == grpc.StatusCode.UNAUTHENTICATED, (service, name, code)
                assert "x-api-key" in detail


def _init(url: str, key: str) -> requests.Response:
    return requests.post(f"{url}/api/infer_stream_init", json={}, headers={"X-API-Key": key}, timeout=10)


def test_sessions_are_counted_per_key_and_names_not_keys_are_shown(keyed):
    url = keyed["url"]
    alice = [_init(url, KEYS["alice"]).json()["session_id"] for _ in range(2)]
    refused = _init(url, KEYS["alice"])
    assert refused.status_code == 429 and "key:alice" in refused.json()["detail"]
    bob = _init(url, KEYS["bob"])  # same address, another key: a limit of its own
    assert bob.status_code == 200
    # --api-key's one key is nobody's own: counted per address, as without keys.
    single = requests.post(f"{url}/api/infer_stream_init", json={}, headers={"Authorization": f"Bearer {SINGLE}"}, timeout=10)
    assert single.status_code == 200
    for session_id, key in [*((s, KEYS["alice"]) for s in alice), (bob.json()["session_id"], KEYS["bob"]),
                            (single.json()["session_id"], SINGLE)]:  # fmt: skip
        assert requests.delete(f"{url}/api/infer_stream_close/{session_id}", headers={"X-API-Key": key}, timeout=10).ok
    assert _init(url, KEYS["alice"]).status_code == 200  # room again
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    assert 'a2e_client_requests_total{client="alice",door="rest"}' in metrics
    time.sleep(0.5)  # the access log is written as the answer goes
    log = keyed["log"].read_text()
    lines = [json.loads(line) for line in log.splitlines() if '"a2e.access"' in line]
    assert any(line.get("client_key") == "alice" for line in lines)
    for secret in (*KEYS.values(), SINGLE):
        assert secret not in log and secret not in metrics


def test_a_browser_sends_its_key_as_a_websocket_subprotocol(keyed):
    ws_url = keyed["url"].replace("http", "ws") + "/api/stream"
    with connect(ws_url, subprotocols=["a2e", f"a2e-key.{KEYS['alice']}"], open_timeout=10) as ws:
        assert ws.subprotocol == "a2e"  # the key is never echoed
        ws.send(json.dumps({"type": "start"}))
        assert json.loads(ws.recv(10))["type"] == "started"
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url, subprotocols=["a2e", "a2e-key.wrong"], open_timeout=10).close()
    assert refused.value.response.status_code == 401


def pcm(seconds: float) -> bytes:
    return (speech_like(seconds) * 32767).astype("<i2").tobytes()


def test_a_revoked_key_ends_its_open_streams_at_their_next_message(keyed):
    from server.ace_grpc import protocol as p

    url, path = keyed["url"], keyed["keys"]
    stack = contextlib.ExitStack()
    ws = stack.enter_context(connect(url.replace("http", "ws") + "/api/stream", additional_headers={"X-API-Key": KEYS["bob"]}, open_timeout=10))
    ws.send(json.dumps({"type": "start"}))
    assert json.loads(ws.recv(10))["type"] == "started"
    ws.send(pcm(1.0))
    assert json.loads(ws.recv(10))["type"] == "frames"
    # A gRPC stream with the same key, its header answered.
    outbox: queue.Queue = queue.Queue()
    header = p.messages.AudioWithEmotionStream(audio_stream_header=p.messages.AudioWithEmotionStreamHeader(
        audio_header=p.audio.AudioHeader(samples_per_second=16000, bits_per_sample=16, channel_count=1)))  # fmt: skip
    outbox.put(header)
    channel = grpc.insecure_channel(keyed["grpc"])
    answers = p.services.A2FControllerServiceStub(channel).ProcessAudioStream(
        iter(outbox.get, None), timeout=30, metadata=(("authorization", f"Bearer {KEYS['bob']}"),)
    )
    assert next(answers).WhichOneof("stream_part") == "animation_data_stream_header"
    try:
        path.write_text(keys_text(["alice"]))  # bob's line removed
        deadline = time.time() + 5
        while _init(url, KEYS["bob"]).status_code != 401:  # re-read within about a second
            assert time.time() < deadline, "the keys file was not re-read"
            time.sleep(0.2)
        ws.send(pcm(1.0))
        with pytest.raises(ConnectionClosed):
            while True:
                message = json.loads(ws.recv(10))
                if message["type"] == "error":
                    assert message["status"] == 401 and "revoked" in message["detail"]
        outbox.put(p.messages.AudioWithEmotionStream(audio_with_emotion=p.messages.AudioWithEmotion(audio_buffer=pcm(1.0))))
        with pytest.raises(grpc.RpcError) as ended:
            for _ in answers:
                pass
        assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in ended.value.details()
        assert _init(url, KEYS["alice"]).status_code == 200  # the others' keys still work
    finally:
        outbox.put(None)
        channel.close()
        stack.close()
        path.write_text(keys_text(["alice", "bob"]))


def test_sessions_per_key_count_across_a_cluster(tmp_path):
    from tests.cluster_parts import Node, RedisServer, require

    require("redis-server")
    keys = tmp_path / "clients.keys"
    keys.write_text(keys_text(["alice", "bob"]))
    redis = RedisServer(tmp_path).start()
    args = ["--model", "a2e-lite", "--state", redis.url, "--api-keys-file", str(keys), "--max-sessions-per-client", "2"]
    nodes = [Node(args).start(wait=False) for _ in range(2)]
    try:
        for node in nodes:
            node.wait_healthy()
        assert _init(nodes[0].url, KEYS["alice"]).status_code == 200
        assert _init(nodes[1].url, KEYS["alice"]).status_code == 200
        third = _init(nodes[0].url, KEYS["alice"])
        assert third.status_code == 429 and "key:alice" in third.json()["detail"]
        assert _init(nodes[1].url, KEYS["bob"]).status_code == 200
    finally:
        for node in nodes:
            node.stop()
        redis.stop()
