"""The session store's failover, with real processes and signals: a primary,
a replica and three sentinels (``local_cluster``, as ``lam-a2e cluster up
--redis sentinel`` starts them), nodes behind HAProxy round robin, and
seeded sessions sent by ``a2e_client`` in real time while the store fails.

Every session's frames are compared, frame by frame, with the same session
on one node with the memory store: no session lost, no frame lost or given
twice, in both ``--state-ack`` modes. Equal to within what batching gives:
chunks that wait out a failover run in bigger batches, and a batch of
another size rounds float32 differently (measured: up to 5e-7 before the
answer's six decimals; a lost or doubled chunk, or a wrong state, changes
frames by orders of magnitude more).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from a2e_client import Client
from a2e_client.replay import TOLERANCE
from engine.redis_sessions import OPERATION_TIMEOUT_S
from tests.cluster_parts import Cluster, Node, Sentinels

CHUNK_S = 0.5
CHUNKS = 12
SESSIONS = 12
VARIANTS = 3  # distinct (seed, voice, audio): sessions of one variant must give the same frames
DOWN_AFTER_MS = 1000
NODE_ARGS = ["--model", "a2e-lite", "--grpc-port", "0", "--max-sessions-per-client", "1000", "--state-failover-s", "10"]


def voice(variant: int) -> list[bytes]:
    """A variant's audio as 0.5 s chunks of 16 kHz s16le PCM (voiced bursts)."""
    rng = np.random.default_rng(variant)
    t = np.arange(int(CHUNKS * CHUNK_S * 16000)) / 16000
    x = 0.3 * np.sin(2 * np.pi * (140 + 20 * variant) * t) * (np.sin(2 * np.pi * 1.3 * t) > -0.2) + 0.02 * rng.standard_normal(len(t))
    pcm = (x * 32767).astype("<i2").tobytes()
    step = int(CHUNK_S * 16000) * 2
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


def run_session(url: str, variant: int, offset: float, t0: float) -> dict:
    client = Client(url, timeout_s=30, retries=20, max_retry_wait_s=1.0)
    got, stalls = [], []
    with client.open_session(id_idx=variant, seed=100 + variant) as session:
        for k, chunk in enumerate(voice(variant)):
            due = t0 + offset + k * CHUNK_S
            time.sleep(max(0.0, due - time.perf_counter()))
            started = time.perf_counter()
            answer = session.send(chunk, pcm=True)
            stalls.append(time.perf_counter() - started)
            got += [f["weights"] for f in answer["frames"]]
        return {"frames": got, "replayed": session.replayed, "longest": max(stalls), "variant": variant}


def run_all(url: str, fault=None) -> list[dict]:
    """SESSIONS paced sessions against ``url``; ``fault()`` runs in a thread
    once they are a third of the way in."""
    t0 = time.perf_counter() + 0.5
    with ThreadPoolExecutor(SESSIONS + 1) as pool:
        runs = [pool.submit(run_session, url, i % VARIANTS, CHUNK_S * i / SESSIONS, t0) for i in range(SESSIONS)]
        if fault is not None:
            time.sleep(max(0.0, t0 + CHUNKS * CHUNK_S / 3 - time.perf_counter()))
            threading.Thread(target=fault, daemon=True).start()
        return [run.result(timeout=120) for run in runs]


def counter(cluster: Cluster, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", cluster.metrics(), re.M))


@pytest.fixture(scope="module")
def first_store(tmp_path_factory):
    sentinels = Sentinels(tmp_path_factory.mktemp("sentinel"), down_after_ms=DOWN_AFTER_MS).start()
    yield sentinels
    sentinels.stop()


def fresh_store(first_store: Sentinels, workdir: Path, guard: bool):
    """A new primary, replica and sentinels for each test, on the sentinels'
    ports the nodes know: one fault's aftermath is not the next one's start."""
    first_store.stop()
    sentinels = Sentinels(workdir, down_after_ms=DOWN_AFTER_MS, ports=first_store.ports, guard=guard).start()
    yield sentinels
    sentinels.stop()


@pytest.fixture
def store(first_store, clusters, tmp_path):
    """As deploy/ runs it: min-replicas-to-write 1."""
    yield from fresh_store(first_store, tmp_path, True)


@pytest.fixture
def unguarded_store(first_store, clusters, tmp_path):
    """Without min-replicas-to-write, as many managed Redis services run: a
    primary whose replica lags goes on answering writes it may lose."""
    yield from fresh_store(first_store, tmp_path, False)


@pytest.fixture(scope="module")
def clusters(first_store, tmp_path_factory):
    """Two nodes in each --state-ack mode on the one store, and the reference: one node, memory store."""
    work = tmp_path_factory.mktemp("nodes")
    made = {ack: Cluster(work, [[*NODE_ARGS, "--state-ack", ack]] * 2, redis=first_store) for ack in ("primary", "replica")}
    reference = Node([*NODE_ARGS, "--state", "memory"])
    parts = [*(n for c in made.values() for n in c.nodes), reference]
    for node in parts:
        node.start(wait=False)
    for node in parts:
        node.wait_healthy()
    for cluster in made.values():
        cluster.proxy.start()
        cluster.wait_all_up()
    made["reference"] = reference
    yield made
    for cluster in (made["primary"], made["replica"]):
        cluster.stop()
    reference.stop()


@pytest.fixture(scope="module")
def expected(clusters) -> dict[int, list]:
    """Each variant's frames from the memory store."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(VARIANTS) as pool:
        runs = {v: pool.submit(run_session, clusters["reference"].url, v, 0.0, t0) for v in range(VARIANTS)}
        return {v: run.result(timeout=60)["frames"] for v, run in runs.items()}


def check_none_lost(results: list[dict], expected: dict[int, list]) -> None:
    for r in results:
        want = np.array(expected[r["variant"]])
        assert len(r["frames"]) == len(want), "frames lost or given twice"
        got = np.array(r["frames"])
        assert np.abs(got - want).max() <= TOLERANCE, "frames differ from the memory store's"


def resume(store: Sentinels) -> None:
    """No server of the store left stopped (each test gets a new store)."""
    for server in store.servers:
        if server.proc is not None and server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)


def lose_the_replicas_last_writes(store: Sentinels) -> dict:
    """The replica falls behind (replication cut for 1.5 s), then the primary
    is SIGKILLed: Sentinel promotes a replica that lacks the last writes.
    The old primary is started again once the failover is done."""
    primary = store.primary()
    replica = next(s for s in store.servers if s is not primary)
    seen = {"primary": primary.port}
    # Cut replication off (a replica of a closed port), not merely pause it:
    # a stopped replica would still find the stream waiting in its socket.
    replica.client().execute_command("REPLICAOF", "127.0.0.1", "1")
    time.sleep(1.5)
    primary.proc.kill()
    primary.proc.wait()
    store.wait_for(lambda: store.primary_port() == replica.port, "the failover", 30)
    seen["failed_over_at"] = time.perf_counter()
    # Back, as a restart policy brings it (compose's restart: unless-stopped):
    # Sentinel makes it a replica of the new primary, which --state-ack
    # replica needs before it can answer again.
    primary.start()
    return seen


def test_a_sentinel_that_knows_no_such_service_stops_start_up(first_store):
    import subprocess
    import sys

    url = first_store.url.rsplit("/", 1)[0] + "/no-such-service"
    out = subprocess.run([sys.executable, "app.py", "--state", url, "--grpc-port", "0", "--port", "0"], capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    assert out.returncode == 2 and "knows no service 'no-such-service'" in out.stderr and "Traceback" not in out.stderr


def lose_writes_during_a_run(store: Sentinels, cluster: Cluster, expected: dict[int, list]) -> list[dict]:
    """The sessions' run with lose_the_replicas_last_writes midway, each
    session's frames checked against the memory store's."""
    try:
        results = run_all(cluster.url, lambda: lose_the_replicas_last_writes(store))
    finally:
        resume(store)
    check_none_lost(results, expected)
    return results


def test_a_failover_that_loses_answered_chunks_is_replayed_by_the_client(unguarded_store, clusters, expected):
    """--state-ack primary: chunks answered while the replica lagged are lost
    with the primary; the sessions say which chunk they expect, the clients
    send the kept audio again and check each answer, and no frame is lost,
    doubled or different."""
    store, cluster = unguarded_store, clusters["primary"]
    rollbacks = counter(cluster, "a2e_state_store_rollbacks_total")
    results = lose_writes_during_a_run(store, cluster, expected)
    assert sum(r["replayed"] for r in results) > 0, "the failover was meant to lose answered chunks"
    assert counter(cluster, "a2e_state_store_rollbacks_total") > rollbacks
    assert max(r["longest"] for r in results) < DOWN_AFTER_MS / 1000 + 1.5 + 3 + 1.5  # the replica's pause, Sentinel's, 3 s


def test_with_replica_ack_a_lagging_replica_holds_answers_back_and_nothing_is_replayed(unguarded_store, clusters, expected):
    """--state-ack replica: the same fault, on the same unguarded store;
    while the replica is cut off no chunk is answered (503 after the ack
    timeout, retried by the client with its chunk_index), so the failover
    loses no answered chunk."""
    store, cluster = unguarded_store, clusters["replica"]
    unacked = counter(cluster, "a2e_state_store_unacked_total")
    results = lose_writes_during_a_run(store, cluster, expected)
    assert sum(r["replayed"] for r in results) == 0
    assert counter(cluster, "a2e_state_store_unacked_total") > unacked
