"""A local cluster: a Redis of the chosen shape, nodes on it and HAProxy in
front (``local_cluster.redis_parts``, ``local_cluster.nodes``).

The one idea: the nodes get the store's ``--state`` URL from the part that
started it, so a single server, Sentinel and Redis Cluster are started,
reached and stopped the same way.
"""

from __future__ import annotations

import time
from pathlib import Path

import requests

from .nodes import HAProxy, Node
from .redis_parts import RedisCluster, RedisServer, Sentinels

REDIS_KINDS = ("single", "sentinel", "cluster")


def redis_of(kind: str, workdir: Path, fsync: str = "always", down_after_ms: int = 1000):
    """The Redis part for ``kind``: RedisServer, Sentinels or RedisCluster."""
    if kind == "single":
        return RedisServer(workdir, fsync)
    if kind == "sentinel":
        return Sentinels(workdir, down_after_ms=down_after_ms, fsync=fsync)
    if kind == "cluster":
        return RedisCluster(workdir, fsync=fsync)
    raise ValueError(f"redis must be one of {', '.join(REDIS_KINDS)}, got {kind!r}")


class Cluster:
    """Redis, ``len(node_args)`` nodes on it and HAProxy in front: a cluster on loopback."""

    def __init__(self, workdir: Path, node_args: list[list[str]], balance: str = "roundrobin",
                 env: dict[str, str] | None = None, grpc: bool = False, redis="single",
                 fsync: str = "always", down_after_ms: int = 1000, logs: bool = False) -> None:  # fmt: skip
        """``redis``: a kind (single, sentinel, cluster) to start and stop with
        the nodes, or a part already started, which stays the caller's."""
        self.owns_redis = isinstance(redis, str)
        self.redis = redis_of(redis, workdir, fsync, down_after_ms) if self.owns_redis else redis
        self.nodes = []
        for i, args in enumerate(node_args):
            log = workdir / f"node{i + 1}.log" if logs else None
            self.nodes.append(Node([*args, "--state", self.redis.url], env, grpc, log))
        max_body = float((env or {}).get("A2E_MAX_UPLOAD_MB", 50.0))
        grpc_ports = [n.grpc_port for n in self.nodes] if grpc else None
        self.proxy = HAProxy(workdir, [n.port for n in self.nodes], balance, max_body, grpc_ports)

    @property
    def url(self) -> str:
        return self.proxy.url

    def start(self) -> "Cluster":
        if self.owns_redis:
            self.redis.start()
        for node in self.nodes:  # torch imports in parallel
            node.start(wait=False)
        for node in self.nodes:
            node.wait_healthy()
        self.proxy.start()
        self.wait_all_up()
        return self

    def wait_all_up(self, timeout_s: float = 30.0) -> None:
        """Until HAProxy's health checks see every live node (a fresh start, or a restarted node)."""
        deadline = time.time() + timeout_s
        live = sum(1 for n in self.nodes if n.proc is not None and n.proc.poll() is None)
        while time.time() < deadline:
            seen = {requests.get(self.url + "/api/health?detail", timeout=5).headers.get("X-A2E-Node") for _ in range(2 * live)}
            if len(seen - {None}) >= live:
                return
            time.sleep(0.2)

    def metrics(self) -> str:
        """Every live node's /metrics, one after the other."""
        texts = []
        for node in self.nodes:
            try:
                texts.append(requests.get(node.url + "/metrics", timeout=5).text)
            except requests.ConnectionError:
                pass
        return "\n".join(texts)

    def stop(self) -> None:
        self.proxy.stop()
        for node in self.nodes:
            node.stop()
        if self.owns_redis:
            self.redis.stop()
