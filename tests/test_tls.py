"""TLS and mutual TLS on HTTP (with the WebSocket) and gRPC, with real
certificates (tests/certs.py): a real scanner (sslyze) finds TLS 1.2 and
1.3 only, forward-secret AEAD suites only and the chain served; plain HTTP
on the TLS port gets a clear 400; a renewed certificate is used without a
restart or a dropped stream; mutual TLS refuses clients without a
certificate of the right CA at the handshake; our client and NVIDIA-shaped
clients in ``tls`` and ``mtls`` modes work; start-up names bad files."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
import requests
from websockets.sync.client import connect

from a2e.errors import ConfigError
from a2e_client import Client
from runtime.settings import load_settings
from server import tls
from server.credentials import Credentials
from tests.certs import issue, make_ca
from tests.cluster_parts import Node, require, wait_for_port
from tests.conftest import ENGLISH, speech_like
from tests.test_end_to_end import free_port, stop, wait_until_healthy

ROOT = Path(__file__).resolve().parent.parent
KEY = "tls-test-key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other = make_ca(d, "test-ca"), make_ca(d, "other-ca")
    return {
        "dir": d, "ca": ca, "ca_pem": ca.path, "server": issue(ca, d, "server"),
        "renewed": issue(ca, d, "renewed-server"), "alice": issue(ca, d, "alice", client=True),
        "stranger": issue(other, d, "mallory", client=True), "expired": issue(ca, d, "old", client=True, expired=True),
    }  # fmt: skip


class Server:
    def __init__(self, workdir: Path, pki: dict, *extra: str) -> None:
        self.cert, self.key = workdir / "server.crt", workdir / "server.key"
        shutil.copy(pki["server"].cert, self.cert)
        shutil.copy(pki["server"].key, self.key)
        self.port, self.grpc_port = free_port(), free_port()
        self.log = workdir / "server.log"
        cmd = [sys.executable, "app.py", "--model", "a2e-lite", "--host", "127.0.0.1", "--port", str(self.port),
               "--grpc-port", str(self.grpc_port), "--tls-cert", str(self.cert), "--tls-key", str(self.key),
               "--api-key", KEY, "--stream-hop-s", "0.5", *extra]  # fmt: skip
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
                                         env=dict(os.environ, A2E_LOG_LEVEL="info"))  # fmt: skip
        https = {"verify": str(pki["ca_pem"])}
        if "--tls-client-ca" in extra:
            https["cert"] = (str(pki["alice"].cert), str(pki["alice"].key))
        wait_until_healthy(self.proc, self.port, **https)
        self.url = f"https://127.0.0.1:{self.port}"
        self.grpc = f"127.0.0.1:{self.grpc_port}"


@pytest.fixture(scope="module")
def tls_server(pki, tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("tls"), pki)
    yield server
    stop(server.proc)


@pytest.fixture(scope="module")
def mtls_server(pki, tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("mtls"), pki, "--tls-client-ca", str(pki["ca_pem"]))
    yield server
    stop(server.proc)


def served_certificate(port: int, alpn: str | None = None) -> bytes:
    """The DER certificate a fresh handshake on ``port`` gets."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols([alpn])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, context.wrap_socket(raw) as s:
        return s.getpeercert(binary_form=True)


def der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


# -- the policy, as a scanner sees it -------------------------------------------------


@pytest.mark.parametrize("door", ["http", "grpc"])
def test_a_scanner_finds_tls_1_2_and_1_3_only_and_strong_suites(tls_server, door):
    scan_policy(tls_server.port if door == "http" else tls_server.grpc_port, tls_server.cert)


def scan_policy(port: int, cert: Path) -> None:
    """sslyze on ``port``: no SSL 2/3, TLS 1.0/1.1 or compression; TLS 1.2
    with ECDHE AEAD suites only, TLS 1.3; ``cert`` served first in the chain."""
    from sslyze import Scanner, ScanCommand, ServerNetworkLocation, ServerScanRequest, ServerScanStatusEnum

    commands = {ScanCommand.SSL_2_0_CIPHER_SUITES, ScanCommand.SSL_3_0_CIPHER_SUITES, ScanCommand.TLS_1_0_CIPHER_SUITES,
                ScanCommand.TLS_1_1_CIPHER_SUITES, ScanCommand.TLS_1_2_CIPHER_SUITES, ScanCommand.TLS_1_3_CIPHER_SUITES,
                ScanCommand.CERTIFICATE_INFO, ScanCommand.TLS_COMPRESSION}  # fmt: skip
    scanner = Scanner()
    scanner.queue_scans([ServerScanRequest(server_location=ServerNetworkLocation("127.0.0.1", port), scan_commands=commands)])
    (result,) = list(scanner.get_results())
    assert result.scan_status == ServerScanStatusEnum.COMPLETED, result.connectivity_error_trace
    scan = result.scan_result

    def accepted(attempt) -> list[str]:
        assert attempt.error_trace is None, attempt.error_trace
        return [s.cipher_suite.name for s in attempt.result.accepted_cipher_suites]

    for old in (scan.ssl_2_0_cipher_suites, scan.ssl_3_0_cipher_suites, scan.tls_1_0_cipher_suites, scan.tls_1_1_cipher_suites):
        assert accepted(old) == []
    tls12, tls13 = accepted(scan.tls_1_2_cipher_suites), accepted(scan.tls_1_3_cipher_suites)
    assert tls12 and tls13
    assert all(s.startswith("TLS_ECDHE_") and ("GCM" in s or "CHACHA20" in s) for s in tls12), tls12
    assert not scan.tls_compression.result.supports_compression
    (deployment,) = scan.certificate_info.result.certificate_deployments
    served = [c.public_bytes(serialization.Encoding.DER) for c in deployment.received_certificate_chain]
    assert served[0] == der(cert)


def test_plain_http_on_the_tls_port_is_told_to_use_https(tls_server):
    res = requests.get(f"http://127.0.0.1:{tls_server.port}/api/health", timeout=5)
    assert res.status_code == 400 and "https://" in res.json()["detail"]
    t0 = time.perf_counter()
    with grpc.insecure_channel(tls_server.grpc) as channel:  # a plaintext gRPC client: refused, not left waiting
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=20)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and time.perf_counter() - t0 < 10


def test_our_client_and_cli_over_https(tls_server, pki):
    client = Client(tls_server.url, api_key=KEY, ca_cert=pki["ca_pem"])
    result = client.animate(ENGLISH)
    assert len(result["frames"]) == 240
    pcm = (speech_like(2.0) * 32767).astype("<i2").tobytes()
    frames = list(client.stream_websocket([pcm[i : i + 8000] for i in range(0, len(pcm), 8000)]))  # wss://
    assert len(frames) == 60
    with pytest.raises(requests.exceptions.SSLError):
        Client(tls_server.url, api_key=KEY).health()  # a private CA is not trusted by default
    out = subprocess.run([sys.executable, "-m", "a2e_client.cli", "--url", tls_server.url, "--ca-cert", str(pki["ca_pem"]),
                          "health"], capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0 and json.loads(out.stdout)["status"] == "healthy", out.stderr
    out = subprocess.run([sys.executable, "-m", "a2e_client.cli", "--url", tls_server.url, "health"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert out.returncode == 1 and "--ca-cert" in out.stderr


def nvidia_client(target: str, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    from tests.test_ace_grpc import english_s16

    clip = tmp_path / "clip.raw"
    clip.write_bytes(english_s16(3.0).tobytes())
    return subprocess.run([sys.executable, str(ROOT / "tests" / "nvidia_stub_client.py"), target, str(clip), "16000", "9", *flags],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def nvidia_modules() -> bool:
    from tests.test_ace_grpc import _nvidia_modules_installed

    return _nvidia_modules_installed()


@pytest.mark.skipif(not nvidia_modules(), reason="NVIDIA's nvidia-audio2face-3d is not installed (.ci/run installs it)")
def test_nvidia_shaped_client_in_tls_mode(tls_server, pki, tmp_path):
    ok = nvidia_client(tls_server.grpc, tmp_path, "--secure-mode", "tls", "--ca-cert", str(pki["ca_pem"]), "--api-key", KEY)
    assert ok.returncode == 0, ok.stderr
    answer = json.loads(ok.stdout)
    assert answer["status"] == "SUCCESS" and answer["frames"] == 90
    keyless = nvidia_client(tls_server.grpc, tmp_path, "--secure-mode", "tls", "--ca-cert", str(pki["ca_pem"]))
    assert keyless.returncode != 0 and "UNAUTHENTICATED" in keyless.stderr and "x-api-key" in keyless.stderr


# -- a renewed certificate ------------------------------------------------------------------


def test_a_renewed_certificate_is_used_without_a_restart_or_a_dropped_stream(tls_server, pki):
    assert served_certificate(tls_server.port) == der(pki["server"].cert)
    ws = connect(tls_server.url.replace("https", "wss") + "/api/stream", additional_headers={"X-API-Key": KEY},
                 ssl=ssl.create_default_context(cafile=str(pki["ca_pem"])), open_timeout=10)  # fmt: skip
    with ws:
        ws.send(json.dumps({"type": "start"}))
        assert json.loads(ws.recv(10))["type"] == "started"
        pcm = (speech_like(1.0) * 32767).astype("<i2").tobytes()
        ws.send(pcm)
        assert json.loads(ws.recv(10))["type"] == "frames"
        # Half a renewal (the new certificate, the old key): nothing changes yet.
        shutil.copy(pki["renewed"].cert, tls_server.cert)
        time.sleep(1.5)
        assert served_certificate(tls_server.port) == der(pki["server"].cert)
        shutil.copy(pki["renewed"].key, tls_server.key)
        deadline = time.time() + 5
        while served_certificate(tls_server.port) != der(pki["renewed"].cert):
            assert time.time() < deadline, "the renewed certificate was not picked up"
            time.sleep(0.3)
        deadline = time.time() + 5
        while served_certificate(tls_server.grpc_port, alpn="h2") != der(pki["renewed"].cert):
            assert time.time() < deadline, "gRPC did not pick up the renewed certificate"
            time.sleep(0.3)
        ws.send(pcm)  # the stream opened before the renewal goes on
        message = json.loads(ws.recv(10))
        assert message["type"] == "frames" and message["first_frame"] > 0
    assert "re-read" in tls_server.log.read_text() and "cannot be used yet" in tls_server.log.read_text()


# -- mutual TLS --------------------------------------------------------------------------------


def test_mutual_tls_refuses_at_the_handshake_without_a_certificate_of_its_ca(mtls_server, pki):
    url, ca = mtls_server.url + "/api/health", str(pki["ca_pem"])
    for who in (None, "stranger", "expired"):
        cert = None if who is None else (str(pki[who].cert), str(pki[who].key))
        with pytest.raises(requests.exceptions.ConnectionError):  # SSLError included: refused at the handshake
            requests.get(url, verify=ca, cert=cert, timeout=5)
    alice = (str(pki["alice"].cert), str(pki["alice"].key))
    assert requests.get(url, verify=ca, cert=alice, timeout=5).status_code == 200
    # The key is still asked for on top of the certificate.
    init = mtls_server.url + "/api/infer_stream_init"
    assert requests.post(init, json={}, verify=ca, cert=alice, timeout=5).status_code == 401
    assert requests.post(init, json={}, verify=ca, cert=alice, headers={"X-API-Key": KEY}, timeout=5).status_code == 200
    client = Client(mtls_server.url, api_key=KEY, ca_cert=ca, client_cert=pki["alice"].cert, client_key=pki["alice"].key)
    assert len(client.animate(ENGLISH)["frames"]) == 240


@pytest.mark.skipif(not nvidia_modules(), reason="NVIDIA's nvidia-audio2face-3d is not installed (.ci/run installs it)")
def test_nvidia_shaped_client_in_mtls_mode(mtls_server, pki, tmp_path):
    ca = ["--ca-cert", str(pki["ca_pem"])]
    ok = nvidia_client(mtls_server.grpc, tmp_path, "--secure-mode", "mtls", *ca, "--client-cert", str(pki["alice"].cert),
                       "--client-key", str(pki["alice"].key), "--api-key", KEY)  # fmt: skip
    assert ok.returncode == 0 and json.loads(ok.stdout)["status"] == "SUCCESS", ok.stderr
    stranger = nvidia_client(mtls_server.grpc, tmp_path, "--secure-mode", "mtls", *ca, "--client-cert", str(pki["stranger"].cert),
                             "--client-key", str(pki["stranger"].key), "--api-key", KEY)  # fmt: skip
    assert stranger.returncode != 0 and "UNAVAILABLE" in stranger.stderr
    no_cert = nvidia_client(mtls_server.grpc, tmp_path, "--secure-mode", "tls", *ca, "--api-key", KEY)
    assert no_cert.returncode != 0 and "UNAVAILABLE" in no_cert.stderr


def test_a_client_certificate_can_be_the_credential(pki, tmp_path):
    server = Server(tmp_path, pki, "--tls-client-ca", str(pki["ca_pem"]), "--tls-client-cert-is-key")
    try:
        ca, alice = str(pki["ca_pem"]), (str(pki["alice"].cert), str(pki["alice"].key))
        res = requests.post(server.url + "/api/infer_stream_init", json={}, verify=ca, cert=alice, timeout=5)
        assert res.status_code == 200
        metrics = requests.get(server.url + "/metrics", verify=ca, cert=alice, timeout=5).text
        assert 'a2e_client_requests_total{client="cert:alice",door="rest"}' in metrics
        wrong = requests.post(server.url + "/api/infer_stream_init", json={}, verify=ca, cert=alice,
                              headers={"X-API-Key": "wrong"}, timeout=5)  # fmt: skip
        assert wrong.status_code == 401  # a wrong key is refused, certificate or not
    finally:
        stop(server.proc)


# -- start-up ----------------------------------------------------------------------------------


def test_unusable_files_stop_start_up_naming_the_file_and_the_problem(pki, tmp_path):
    server, alice = pki["server"], pki["alice"]
    not_pem = tmp_path / "notpem.crt"
    not_pem.write_text("hello")
    for flags, said in [
        (["--tls-cert", str(tmp_path / "nope.crt"), "--tls-key", str(server.key)], f"{tmp_path / 'nope.crt'} (--tls-cert) does not exist"),
        (["--tls-cert", str(server.cert), "--tls-key", str(alice.key)], f"the key {alice.key} (--tls-key) does not match the certificate {server.cert}"),
        (["--tls-cert", str(not_pem), "--tls-key", str(server.key)], f"{not_pem} (--tls-cert) is not PEM"),
        (["--tls-cert", str(server.cert), "--tls-key", str(server.key), "--tls-client-ca", str(not_pem)], "--tls-client-ca"),
        (["--tls-cert", str(server.cert)], "TLS needs both --tls-cert and --tls-key"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(said)):
            tls.check(load_settings(flags, environ={}))
    with pytest.raises(ConfigError, match="cannot read the keys file"):
        Credentials.from_settings(load_settings(["--api-keys-file", str(tmp_path / "none.keys")], environ={}))
    # And the server itself says so and exits 2, before loading anything.
    out = subprocess.run([sys.executable, "app.py", "--tls-cert", str(server.cert), "--tls-key", str(alice.key), "--port", str(free_port()),
                          "--grpc-port", "0"], capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert out.returncode == 2 and "does not match the certificate" in out.stderr and "Traceback" not in out.stderr


# -- or TLS terminated at HAProxy (deploy/haproxy/tls.cfg) -----------------------------------

HAPROXY_BACKENDS = """\
global
    maxconn 1024
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
backend lam_a2e_nodes
    server node 127.0.0.1:{http}
backend lam_a2e_grpc_nodes
    mode tcp
    server node 127.0.0.1:{grpc}
"""


def test_haproxy_terminates_tls_for_plain_nodes_with_the_shipped_configuration(pki, tmp_path):
    haproxy = require("haproxy")
    node = Node(["--model", "a2e-lite", "--api-key", KEY, "--stream-hop-s", "0.5"], grpc=True).start()
    bundle = tmp_path / "lam-a2e.pem"
    bundle.write_text(pki["server"].cert.read_text() + pki["server"].key.read_text())
    https, grpcs = free_port(), free_port()
    # The shipped frontends as they are; only the certificate's path and the ports are this machine's.
    shipped = (ROOT / "deploy" / "haproxy" / "tls.cfg").read_text()
    assert shipped.count("/usr/local/etc/haproxy/certs/lam-a2e.pem") == 2
    local = (shipped.replace("/usr/local/etc/haproxy/certs/lam-a2e.pem", str(bundle))
             .replace("bind :8443 ", f"bind 127.0.0.1:{https} ").replace("bind :52443 ", f"bind 127.0.0.1:{grpcs} "))  # fmt: skip
    (tmp_path / "backends.cfg").write_text(HAPROXY_BACKENDS.format(http=node.port, grpc=node.grpc_port))
    (tmp_path / "tls.cfg").write_text(local)
    proxy = subprocess.Popen([haproxy, "-db", "-f", str(tmp_path / "backends.cfg"), "-f", str(tmp_path / "tls.cfg")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        wait_for_port(https)
        wait_for_port(grpcs)
        for port in (https, grpcs):
            scan_policy(port, pki["server"].cert)
        client = Client(f"https://127.0.0.1:{https}", api_key=KEY, ca_cert=pki["ca_pem"])
        assert len(client.animate(ENGLISH)["frames"]) == 240
        pcm = (speech_like(1.0) * 32767).astype("<i2").tobytes()
        assert len(list(client.stream_websocket([pcm[:8000], pcm[8000:]]))) == 30  # wss:// through HAProxy
        init = requests.post(f"https://127.0.0.1:{https}/api/infer_stream_init", json={}, verify=str(pki["ca_pem"]), timeout=5)
        assert init.status_code == 401  # the nodes still ask for the key
        if nvidia_modules():
            ok = nvidia_client(f"127.0.0.1:{grpcs}", tmp_path, "--secure-mode", "tls", "--ca-cert", str(pki["ca_pem"]),
                               "--api-key", KEY)  # fmt: skip
            assert ok.returncode == 0 and json.loads(ok.stdout)["frames"] == 90, ok.stderr
    finally:
        proxy.terminate()
        proxy.wait(10)
        node.kill()
