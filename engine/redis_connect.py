"""Reaching the session store's Redis, however it is deployed: one server
(or a managed endpoint), a primary that Sentinel names, or a Redis Cluster;
and which store errors are a failover in progress rather than a fault.

It owns redis-py's clients and the start-up check of the address; what is
stored, and the retries themselves, are ``engine.redis_sessions``'s.

The one idea: a failover reaches a client as a few kinds of error (the
connection drops, the old primary answers READONLY, Sentinel has no primary
yet, a cluster slot moves), and all of them mean "the same operation will
succeed on the new primary soon". redis-py's Sentinel pool asks Sentinel
for the primary on every new connection, so dropping the connection is
enough to follow it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from a2e.errors import ConfigError
from runtime.store_address import StoreAddress, parse

log = logging.getLogger("a2e.state")

CONNECT_TIMEOUT_S = 1.0
# Error replies that a failover or a resharding gives for a while.
_PASSING_REPLIES = ("READONLY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS")


def client(address: StoreAddress) -> Any:
    """redis-py's asyncio client for ``address`` (not yet connected). No
    socket timeout: redis-py would wrap every read in a timer of its own
    (~70 µs of CPU a call, measured); the caller bounds whole operations."""
    import redis.asyncio as aioredis

    common = dict(socket_timeout=None, socket_connect_timeout=CONNECT_TIMEOUT_S, decode_responses=False)
    if address.kind == "single":
        return aioredis.Redis.from_url(address.url, health_check_interval=30, **common)
    if address.kind == "sentinel":
        from redis.asyncio.sentinel import Sentinel

        sentinels = Sentinel(list(address.hosts), sentinel_kwargs=dict(
            password=address.password, socket_timeout=CONNECT_TIMEOUT_S, socket_connect_timeout=CONNECT_TIMEOUT_S),
            password=address.password, db=address.db, **common)  # fmt: skip
        redis = sentinels.master_for(address.service, redis_class=aioredis.Redis, health_check_interval=30)
        redis.sentinels = sentinels  # for topology()
        return redis
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in address.hosts], password=address.password,
                        require_full_coverage=True, **common)  # fmt: skip


class Line:
    """One connection of redis-py's, used directly for the chunks' round trips:
    packed commands out, replies in, one exchange at a time. redis-py's
    pool, script and retry layers around each call cost ~65 µs of CPU
    (isolated, measured), several times that between model batches; the
    protocol, authentication and TLS stay redis-py's."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.conn: Any = None
        self.lock = asyncio.Lock()

    async def exchange(self, commands: list[tuple]) -> list:
        """Each command's reply, in order (an error reply as its exception,
        but one that a failover gives, which drops the connection and is
        raised: the caller retries the exchange on a new one)."""
        from redis.exceptions import ResponseError

        async with self.lock:
            if self.conn is None:
                self.conn = self.pool.make_connection()
            try:
                await self.conn.connect()  # nothing to do while connected
                await self.conn.send_packed_command(self.conn.pack_commands(commands), check_health=False)
                replies = []
                for _ in commands:
                    try:
                        replies.append(await self.conn.read_response(disable_decoding=True))
                    except ResponseError as error:  # read whole: the connection stays in step
                        replies.append(error)
                passing_reply = next((r for r in replies if isinstance(r, Exception) and passing(r)), None)
                if passing_reply is not None:
                    raise passing_reply  # e.g. READONLY from a demoted primary behind one endpoint
                return replies
            except BaseException:
                # Replies left unread, or a deadline that cut the exchange short: start clean.
                await self.conn.disconnect(nowait=True)
                raise

    async def aclose(self) -> None:
        if self.conn is not None:
            await self.conn.disconnect(nowait=True)
            self.conn = None


def passing(exc: BaseException) -> bool:
    """Whether ``exc`` is what a failover, a restart or a slot's move gives
    for a while (worth retrying the same operation), not a lasting fault."""
    from redis import exceptions as e

    if isinstance(exc, (e.ConnectionError, e.TimeoutError, e.ReadOnlyError, e.BusyLoadingError, asyncio.TimeoutError,
                        e.ClusterDownError, e.TryAgainError, e.MovedError, e.AskError)):  # fmt: skip
        return True
    return isinstance(exc, e.ResponseError) and str(exc).startswith(_PASSING_REPLIES)


async def topology(redis: Any, address: StoreAddress) -> dict[str, Any]:
    """What health shows of the store's shape: Sentinel's primary and
    replicas, or the cluster's primaries; nothing more for one server."""
    if address.kind == "sentinel":
        sentinels = redis.sentinels
        host, port = await sentinels.discover_master(address.service)
        replicas = await sentinels.discover_replicas(address.service)
        return {"mode": "sentinel", "service": address.service, "primary": f"{host}:{port}",
                "replicas": [f"{h}:{p}" for h, p in replicas]}  # fmt: skip
    if address.kind == "cluster":
        nodes = redis.get_nodes()
        return {"mode": "cluster", "primaries": sorted(n.name for n in nodes if n.server_type == "primary"),
                "replicas": sorted(n.name for n in nodes if n.server_type == "replica")}  # fmt: skip
    return {"mode": "single"}


def check_address(url: str) -> None:
    """At start-up: an address that answers but cannot be the store (a
    Sentinel that knows no such service, a server that is not a cluster
    node) stops the server naming what is wrong. One that does not answer
    yet is only logged: the store may start after us, and health says so."""
    import redis
    from redis.exceptions import RedisError

    address = parse(url)
    where = address.redacted()
    if address.kind == "cluster":
        # A session's keys and the limit sets are not yet placed in hash slots
        # that one script may touch together: refused, not left to fail per chunk.
        raise ConfigError(f"--state {where}: Redis Cluster is not supported yet (a session's keys are not yet kept in "
                          "one hash slot); use redis://HOST:PORT or redis+sentinel://HOSTS/SERVICE")  # fmt: skip
    if address.kind == "sentinel":
        answered, asked = [], []
        for host, port in address.hosts:
            asked.append(f"{host}:{port}")
            try:
                sentinel = redis.Redis(host=host, port=port, password=address.password, socket_timeout=CONNECT_TIMEOUT_S,
                                       socket_connect_timeout=CONNECT_TIMEOUT_S)  # fmt: skip
                masters = sentinel.sentinel_masters()
            except RedisError as exc:
                log.warning("sentinel %s:%d does not answer (%s)", host, port, exc)
                continue
            answered.append(f"{host}:{port}")
            if address.service in masters:
                return
        if answered:
            raise ConfigError(f"--state {where}: Sentinel at {', '.join(answered)} knows no service "
                              f"{address.service!r} (check the name after the hosts)")  # fmt: skip
        log.warning("no sentinel of %s answers yet (%s); sessions wait for one", where, ", ".join(asked))
        return
