"""Redis for a local cluster, as operators deploy it: one redis-server with
its append-only file; a primary, a replica and three sentinels watching
them; or a Redis Cluster of three primaries with a replica each
(``redis-cli --cluster create``). Each part says the ``--state`` URL the
nodes are given.

The one idea: these are the real binaries with the settings deploy/ ships
(the failover tests SIGKILL and SIGSTOP them), started on free loopback
ports in a working directory of their own.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from .processes import free_port, require, terminate, wait_for_port


class RedisServer:
    """A redis-server with its append-only file on (as deploy/ runs it), so a
    restart keeps the sessions; ``replica_of``: a replica of that server.
    The tests sync it on every write ("always"); deploy/ and the
    benchmarks, once a second."""

    def __init__(self, workdir: Path, fsync: str = "always", replica_of: "RedisServer | None" = None,
                 extra: list[str] | None = None) -> None:  # fmt: skip
        self.binary = require("redis-server")
        self.fsync = fsync
        self.port = free_port()
        self.dir = workdir / f"redis-{self.port}"
        self.replica_of = replica_of
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "RedisServer":
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
                "--appendonly", "yes", "--appendfsync", self.fsync, "--protected-mode", "no", *self.extra]  # fmt: skip
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of.port)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        return self

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def role(self) -> str:
        """"master" or "slave", as the server itself says."""
        return self.client().info("replication")["role"]

    def flush(self) -> None:
        self.client().flushall()

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None


class Sentinels:
    """A primary, a replica and ``count`` sentinels watching them under
    ``service``; the nodes' URL names every sentinel."""

    def __init__(self, workdir: Path, count: int = 3, service: str = "a2e", down_after_ms: int = 1000,
                 fsync: str = "everysec", ports: list[int] | None = None, guard: bool = True) -> None:  # fmt: skip
        """``ports``: the sentinels' (a new set on the ports of one stopped
        before keeps the nodes' --state URL); else free ones. ``guard``:
        deploy/'s min-replicas-to-write 1 (a primary cut off from its replica
        refuses writes, so one that was paused and comes back cannot answer
        what the promoted replica never sees), at the price of refusing all
        writes while the only replica is away; without it, what a failover
        loses is what clients replay."""
        self.binary = require("redis-sentinel")
        self.service, self.down_after_ms = service, down_after_ms
        extra = ["--min-replicas-to-write", "1", "--min-replicas-max-lag", "2"] if guard else []
        self.servers = [RedisServer(workdir, fsync, extra=extra)]
        self.servers.append(RedisServer(workdir, fsync, replica_of=self.servers[0], extra=extra))
        self.ports = list(ports) if ports else [free_port() for _ in range(count)]
        self.dir = workdir
        self.procs: list[subprocess.Popen | None] = []

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.ports) + f"/{self.service}"

    def start(self) -> "Sentinels":
        for server in self.servers:
            server.start()
        self.wait_in_sync()
        for port in self.ports:
            conf = self.dir / f"sentinel-{port}.conf"  # a sentinel rewrites its file: one each
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.dir}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {self.servers[0].port} 2\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} {max(3000, 3 * self.down_after_ms)}\n"
                f"sentinel parallel-syncs {self.service} 1\n"
            )
            self.procs.append(subprocess.Popen([self.binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in self.ports:
            wait_for_port(port)
        self.wait_for(lambda: all(len(self.known_replicas(p)) == 1 for p in self.ports), "the sentinels to see the replica")
        return self

    def wait_in_sync(self, timeout_s: float = 20.0) -> None:
        self.wait_for(lambda: all(s.proc is None or s.role() == "master" or
                                  s.client().info("replication").get("master_link_status") == "up"
                                  for s in self.servers), "the replica to sync", timeout_s)  # fmt: skip

    def sentinel(self, port: int):
        import redis

        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, decode_responses=True)

    def known_replicas(self, port: int) -> list[dict]:
        return self.sentinel(port).sentinel_slaves(self.service)

    def primary_port(self) -> int:
        """The primary's port as the sentinels name it now."""
        for port in self.ports:
            try:
                return int(self.sentinel(port).sentinel_get_master_addr_by_name(self.service)[1])
            except Exception:  # noqa: BLE001 - that sentinel is down: ask the next
                continue
        raise AssertionError("no sentinel answers")

    def primary(self) -> RedisServer:
        port = self.primary_port()
        return next(s for s in self.servers if s.port == port)

    @staticmethod
    def wait_for(done, what: str, timeout_s: float = 20.0) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                if done():
                    return
            except Exception:  # noqa: BLE001 - a part still starting
                pass
            time.sleep(0.1)
        raise AssertionError(f"waited {timeout_s:g} s for {what}")

    def stop(self) -> None:
        for proc in self.procs:
            terminate(proc)
        for server in self.servers:
            server.stop()


class RedisCluster:
    """A Redis Cluster on loopback: ``shards`` primaries with ``replicas``
    each, made by ``redis-cli --cluster create``."""

    def __init__(self, workdir: Path, shards: int = 3, replicas: int = 1, fsync: str = "everysec") -> None:
        self.cli = require("redis-cli")
        self.servers = [RedisServer(workdir, fsync) for _ in range(shards * (1 + replicas))]
        for server in self.servers:
            server.extra = ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{server.port}.conf",
                            "--cluster-node-timeout", "1000"]  # fmt: skip
        self.replicas = replicas

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(s.address for s in self.servers[:3])

    def start(self) -> "RedisCluster":
        for server in self.servers:
            server.start()
        made = subprocess.run([self.cli, "--cluster", "create", *(s.address for s in self.servers), "--cluster-replicas",
                               str(self.replicas), "--cluster-yes"], capture_output=True, text=True, timeout=60)  # fmt: skip
        if made.returncode != 0:
            raise AssertionError(f"redis-cli --cluster create failed:\n{made.stdout}\n{made.stderr}")
        Sentinels.wait_for(lambda: all(s.client().execute_command("CLUSTER", "INFO").decode().find("cluster_state:ok") >= 0
                                       for s in self.servers), "the cluster to be ok", 30)  # fmt: skip
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
