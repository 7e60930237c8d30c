"""Three nodes sharing a real redis-server behind a real HAProxy, driven by our
client as users drive it: sessions spread over nodes give one node's frames,
a balancer hashing on the session keeps them on one node, gRPC streams
through the balancer's TCP frontend reach every node, raced chunks are
applied once each, an engine restart and a Redis restart lose no session, a
WebSocket stream resumes on another node, and a node killed with SIGKILL in
the middle of 50 sessions loses and doubles no frame.

The tests run in file order: the last two kill a node each."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import requests

from a2e_client import Client
from tests.cluster_parts import Cluster, HAProxy
from tests.conftest import speech_like
from tests.test_ace_grpc import header, run_stream

CHUNK_S = 0.5


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, checkpoint, config_file):
    model = ["--config-file", str(config_file), "--weight", str(checkpoint)]
    nodes = [model, model, [*model, "--workers", "1", "--devices", "cpu", "--health-detail"]]
    made = Cluster(tmp_path_factory.mktemp("cluster"), nodes, grpc=True).start()
    yield made
    made.stop()


class CountingClient(Client):
    """Our client, counting what it sent (retries included) and the statuses it got."""

    def __init__(self, url: str) -> None:
        super().__init__(url, timeout_s=30, retries=8, max_retry_wait_s=2)
        self.sent = 0
        self.statuses: dict[int, int] = {}
        self.nodes: list[str] = []
        self._lock = threading.Lock()
        request = self.http.request

        def counted(*args, **kwargs):
            with self._lock:
                self.sent += 1
            res = request(*args, **kwargs)
            with self._lock:
                self.statuses[res.status_code] = self.statuses.get(res.status_code, 0) + 1
                self.nodes.append(res.headers.get("X-A2E-Node", ""))
            return res

        self.http.request = counted


def pcm(seconds: float, seed: int) -> list[bytes]:
    audio = (speech_like(seconds, seed=seed) * 32767).astype("<i2")
    step = int(CHUNK_S * 16000)
    return [audio[i : i + step].tobytes() for i in range(0, len(audio), step)]


def run_session(client: Client, seed: int, chunks: list[bytes], between=None) -> list[dict]:
    """A seeded session, chunk by chunk; ``between(k)`` runs after chunk k."""
    answers = []
    with client.open_session(id_idx=seed % 3, seed=seed) as session:
        for k, chunk in enumerate(chunks):
            answers.append(session.send(chunk, pcm=True))
            if between is not None:
                between(k)
    return answers


def state_retries(cluster) -> float:
    lines = [line for line in cluster.metrics().splitlines() if line.startswith("a2e_state_store_retries_total{")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def frames_of(answers: list[dict]) -> np.ndarray:
    return np.array([f["weights"] for a in answers for f in a["frames"]])


def assert_whole(answers: list[dict], chunks: list[bytes]) -> None:
    """Every chunk applied once, in order: indices 1..n, each chunk's frames where the frame clock puts them."""
    assert [a["metadata"]["chunk_index"] for a in answers] == list(range(1, len(chunks) + 1))
    samples = 0
    for a, chunk in zip(answers, chunks):
        start = -(-samples * 30 // 16000)
        samples += len(chunk) // 2
        assert a["metadata"]["chunk_start_time"] == pytest.approx(start / 30)
        assert a["metadata"]["frame_count"] == -(-samples * 30 // 16000) - start


def test_sessions_spread_over_nodes_give_the_frames_of_one_node(cluster):
    spread, alone = CountingClient(cluster.url), CountingClient(cluster.nodes[0].url)
    for seed in range(3):
        chunks = pcm(3.0, seed)
        a, b = run_session(spread, seed, chunks), run_session(alone, seed, chunks)
        assert_whole(a, chunks)
        assert np.array_equal(frames_of(a), frames_of(b))
    assert len(set(spread.nodes)) == 3 and len(set(alone.nodes)) == 1  # round robin reached every node


def test_a_balancer_hashing_on_the_session_keeps_its_chunks_on_one_node(cluster, tmp_path):
    proxy = HAProxy(tmp_path, [n.port for n in cluster.nodes], balance="session").start()
    try:
        hashed, spread = CountingClient(proxy.url), CountingClient(cluster.url)
        for seed in (11, 12, 13, 14):
            chunks = pcm(2.0, seed)
            hashed.nodes.clear()
            answers = run_session(hashed, seed, chunks)
            chunk_nodes = hashed.nodes[1:-1]  # between the open and the close: the chunks
            assert len(chunk_nodes) == len(chunks) and len(set(chunk_nodes)) == 1
            assert np.array_equal(frames_of(answers), frames_of(run_session(spread, seed, chunks)))
    finally:
        proxy.stop()


def test_grpc_streams_through_the_balancer_reach_every_node_with_the_frames_of_one(cluster):
    pcm_ = np.frombuffer(b"".join(pcm(3.0, 51)), "<i2")
    direct = run_stream(f"127.0.0.1:{cluster.nodes[0].grpc_port}", header(ints={"seed": 51}), pcm_)
    assert direct.code == grpc.StatusCode.OK, direct.details
    before = _grpc_answers(cluster)
    # A connection of its own for each stream (gRPC shares one between channels
    # to the same address otherwise), so round robin gives each to the next node.
    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    for _ in range(len(cluster.nodes)):
        through = run_stream(cluster.proxy.grpc_target, header(ints={"seed": 51}), pcm_, options=own_connection)
        assert through.code == grpc.StatusCode.OK, through.details
        assert len(through.frames) == 90 and np.array_equal(through.weights, direct.weights)
    after = _grpc_answers(cluster)
    assert all(a > b for a, b in zip(after, before)), (before, after, cluster.proxy.servers())


def _grpc_answers(cluster) -> list[float]:
    """Each node's gRPC answers so far."""
    counts = []
    for node in cluster.nodes:
        text = requests.get(node.url + "/metrics", timeout=5).text
        counts.append(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                          if line.startswith('a2e_stream_answers_total{transport="grpc"')))  # fmt: skip
    return counts


def _post_chunk(url: str, session_id: str, chunk: bytes, index: int | None = None) -> requests.Response:
    data = {"session_id": session_id, "sample_rate": "16000", "encoding": "s16le", "channels": "1"}
    if index is not None:
        data["chunk_index"] = str(index)
    return requests.post(url + "/api/infer_stream_chunk", data=data, files={"audio_chunk": ("c", chunk)}, timeout=30)


def test_two_chunks_raced_to_two_nodes_are_applied_once_each(cluster):
    n0, n1 = cluster.nodes[0].url, cluster.nodes[1].url
    sid = requests.post(n0 + "/api/infer_stream_init", json={"seed": 3}).json()["session_id"]
    chunks = pcm(3.0, 3)
    with ThreadPoolExecutor(2) as pool:
        raced = list(pool.map(lambda a: _post_chunk(a[0], sid, a[1]), [(n0, chunks[0]), (n1, chunks[1])]))
        assert [r.status_code for r in raced] == [200, 200]
        assert sorted(r.json()["metadata"]["chunk_index"] for r in raced) == [1, 2]
        same = list(pool.map(lambda url: _post_chunk(url, sid, chunks[2], 3), [n0, n1]))  # one chunk sent twice
        assert [r.status_code for r in same] == [200, 200]
        assert same[0].json()["frames"] == same[1].json()["frames"]
    ahead = _post_chunk(n1, sid, chunks[3], 5)
    assert ahead.status_code == 409 and ahead.headers["X-Expected-Chunk-Index"] == "4"
    assert "expects chunk_index 4" in ahead.json()["detail"]
    closed = requests.delete(f"{cluster.url}/api/infer_stream_close/{sid}", timeout=10).json()
    assert closed["chunks_processed"] == 3


def test_an_engine_restart_inside_a_node_loses_no_session(cluster):
    node = cluster.nodes[2]
    client = CountingClient(node.url)
    chunks = pcm(3.0, 21)

    def kill_engine(k):
        if k == 2:
            engine = requests.get(node.url + "/api/health").json()["engines"][0]
            import os
            import signal

            os.kill(engine["pid"], signal.SIGKILL)

    answers = run_session(client, 21, chunks, between=kill_engine)
    assert_whole(answers, chunks)
    assert np.array_equal(frames_of(answers), frames_of(run_session(CountingClient(cluster.nodes[0].url), 21, chunks)))
    assert client.statuses.get(503, 0) >= 1  # the restart was seen, and retried
    assert requests.get(node.url + "/api/health").json()["engines"][0]["restarts"] == 1


def test_redis_stopped_and_started_mid_run_is_waited_out_and_goes_on(cluster):
    """A restart shorter than --state-failover-s (10 s by default) is ridden
    through: chunks wait for the store instead of failing, and the waits show
    in the retry counter. (Past --state-failover-s they get 503:
    test_shared_sessions.py.)"""
    client = CountingClient(cluster.url)
    chunks = pcm(4.0, 31)
    retried_before = state_retries(cluster)

    def restart_redis(k):
        if k == 2:
            cluster.redis.stop()
            health = requests.get(cluster.nodes[0].url + "/api/health", timeout=10).json()
            threading.Timer(1.5, cluster.redis.start).start()
            assert health["status"] == "healthy"  # whole clips still work: the balancer keeps the node

    answers = run_session(client, 31, chunks, between=restart_redis)
    assert_whole(answers, chunks)
    assert set(client.statuses) == {200}  # waited out, not failed
    assert state_retries(cluster) > retried_before
    assert np.array_equal(frames_of(answers), frames_of(run_session(CountingClient(cluster.nodes[0].url), 31, chunks)))
    deadline = time.time() + 15
    while requests.get(cluster.nodes[1].url + "/api/health").json()["state"]["reachable"] is not True:
        assert time.time() < deadline, "the store never came back in /api/health"
        time.sleep(0.5)
    errors = [line for line in cluster.metrics().splitlines() if line.startswith("a2e_state_store_errors_total{")]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in errors) >= 1
    print(json.dumps({"sessions": 1, "chunks": len(chunks), "requests_retried": client.sent - len(chunks) - 2,
                      "statuses": client.statuses, "frames": len(frames_of(answers))}))  # fmt: skip


def test_a_websocket_stream_resumes_on_another_node(cluster, tmp_path):
    # "first": every new connection to the first live node of the list, so
    # the test knows which node holds the stream, and the resume lands on the other.
    proxy = HAProxy(tmp_path, [cluster.nodes[1].port, cluster.nodes[0].port], balance="first").start()
    try:
        audio = b"".join(pcm(4.0, 41))
        packets = [audio[i : i + 3200] for i in range(0, len(audio), 3200)]  # 0.1 s each

        def killing(packets):
            """At real-time pace, as a live client sends, with the node killed 2 s in."""
            for k, packet in enumerate(packets):
                if k == 20:
                    cluster.nodes[1].kill()
                time.sleep(0.1)
                yield packet

        got = list(Client(proxy.url, timeout_s=30).stream_websocket(killing(packets), hop=0.5, seed=41))
        # The frame clock gives 4 s of audio 120 frames whatever the chunks: audio
        # sent again twice, or lost, would show as more or fewer. (The values
        # depend on how the audio was cut into runs, which follows its timing,
        # so no second stream would be cut the same way to compare them with.)
        assert [f["time"] for f in got] == pytest.approx([k / 30 for k in range(120)])  # none lost, none twice
        assert cluster.nodes[1].proc.poll() is not None  # the stream did outlive its node
        weights = np.array([f["weights"] for f in got])
        assert weights.shape == (120, 52) and weights[60:].std() > 0.01
    finally:
        proxy.stop()


def test_a_node_killed_in_the_middle_of_50_sessions_loses_no_frame(cluster):
    client = CountingClient(cluster.url)
    seeds = list(range(100, 150))
    chunk_lists = {seed: pcm(3.0, seed) for seed in seeds}
    done = threading.Event()
    progress = {"chunks": 0}

    def one(seed):
        def count(k):
            progress["chunks"] += 1
            if progress["chunks"] == 60 and not done.is_set():
                done.set()
                cluster.nodes[0].kill()

        return run_session(client, seed, chunk_lists[seed], between=count)

    with ThreadPoolExecutor(10) as pool:
        results = dict(zip(seeds, pool.map(one, seeds)))
    assert done.is_set()
    for seed, answers in results.items():
        assert_whole(answers, chunk_lists[seed])
    # As a node alone gives them, for a sample of the sessions: to within what
    # the batches' makeup changes (10 sessions at once share batches; see
    # test_batching's streams-through-the-batcher test), not bit for bit.
    alone = CountingClient(cluster.nodes[2].url)
    for seed in seeds[::10]:
        assert np.abs(frames_of(results[seed]) - frames_of(run_session(alone, seed, chunk_lists[seed]))).max() < 1e-5
    sent = sum(len(c) for c in chunk_lists.values())
    retried = client.sent - sent - 2 * len(seeds)  # beyond one request per chunk, open and close
    expected = sum(-(-sum(len(c) // 2 for c in chunk_lists[seed]) * 30 // 16000) for seed in seeds)
    received = sum(len(frames_of(answers)) for answers in results.values())
    assert received == expected
    print(json.dumps({"sessions": len(seeds), "chunks": sent, "requests_retried": retried, "statuses": client.statuses,
                      "frames_expected": expected, "frames_received": received}))  # fmt: skip
