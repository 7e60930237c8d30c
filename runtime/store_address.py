"""Where the shared session store is (``--state``), read from its URL: one
Redis (``redis://``, ``rediss://``, ``unix://``), a Redis watched by
Sentinel (``redis+sentinel://``), or a Redis Cluster (``redis+cluster://``).

It owns the syntax and what a wrong address is told; connecting is the
engine's (``engine.redis_connect``). Parsing imports nothing of redis-py, so
settings are checked before anything heavy loads.

The one idea: every way of reaching Redis is one URL, so the flag, the
config file and ``A2E_STATE`` carry it alike, and a mistake is reported
with the part of the URL that is wrong, before the server starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from a2e.errors import ConfigError

SINGLE_SCHEMES = ("redis://", "rediss://", "unix://")
SENTINEL, CLUSTER = "redis+sentinel", "redis+cluster"
FORMS = (
    "memory, redis://[:PASSWORD@]HOST:PORT/DB (rediss:// with TLS, unix:///PATH), "
    "redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB] or "
    "redis+cluster://[:PASSWORD@]HOST:PORT[,HOST:PORT...]"
)


@dataclass(frozen=True)
class StoreAddress:
    kind: str  # "single", "sentinel" or "cluster"
    url: str  # as given
    hosts: tuple[tuple[str, int], ...] = ()  # sentinels, or cluster nodes to start from
    service: str = ""  # Sentinel's name for the primary
    db: int = 0
    password: str | None = field(default=None, repr=False)

    def redacted(self) -> str:
        """The address as health and logs show it: without its password."""
        return redacted(self.url)


def redacted(url: str) -> str:
    head, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    auth, _, tail = rest.partition("@")
    user = auth.split(":", 1)[0] if ":" in auth else ""
    return f"{head}://{user}:***@{tail}"


def parse(url: str) -> StoreAddress:
    """The address ``url`` names; ConfigError naming the wrong part."""
    if url.startswith(SINGLE_SCHEMES):
        return _single(url)
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in (SENTINEL, CLUSTER):
        raise ConfigError(f"state must be {FORMS}; got {redacted(url)!r}")
    netloc, _, path = rest.partition("/")
    password = None
    if "@" in netloc:
        auth, _, netloc = netloc.rpartition("@")
        password = unquote(auth.split(":", 1)[1] if ":" in auth else auth) or None
    hosts = tuple(_host_port(part, url) for part in netloc.split(","))
    parts = [p for p in path.split("/") if p]
    if scheme == CLUSTER:
        if parts:
            raise ConfigError(f"--state {redacted(url)}: a Redis Cluster has no databases or service names; "
                              f"drop {'/' + '/'.join(parts)!r}")  # fmt: skip
        return StoreAddress("cluster", url, hosts, password=password)
    if not parts:
        raise ConfigError(f"--state {redacted(url)}: name Sentinel's service after the hosts, "
                          "as in redis+sentinel://HOST:26379/mymaster")  # fmt: skip
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ConfigError(f"--state {redacted(url)}: after the hosts come the service and, optionally, a database "
                          f"number (/SERVICE/DB); got {'/' + '/'.join(parts)!r}")  # fmt: skip
    return StoreAddress("sentinel", url, hosts, parts[0], int(parts[1]) if len(parts) == 2 else 0, password)


def _single(url: str) -> StoreAddress:
    parts = urlsplit(url)
    if parts.scheme != "unix":
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"--state {redacted(url)}: the port is not a number") from None
        if not parts.hostname:
            raise ConfigError(f"--state {redacted(url)}: no host")
        hosts = ((parts.hostname, port or 6379),)
    else:
        hosts = ()
    return StoreAddress("single", url, hosts, password=parts.password)


def _host_port(part: str, url: str) -> tuple[str, int]:
    host, sep, port = part.rpartition(":")
    if not sep:
        host, port = part, ""
    host = host.strip("[]")  # [::1]:26379
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--state {redacted(url)}: {part!r} is not HOST:PORT")
    return host, int(port)
