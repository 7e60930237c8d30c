"""The Redis session store (``--state redis://host:port/db``): where streaming
sessions live when several engines, on one node or many, serve them.

It owns the keys, the Lua scripts that change them atomically, and the
cluster-wide session limits; it does not apply chunks (``engine.shared_streams``
does, with this store's versions) and knows nothing of HTTP.

The one idea: a session's record carries ``n``, the number of chunks applied
to it. An engine reads the record, runs the chunk without holding anything,
and writes the new state only if ``n`` is still what it read (one script,
atomic in Redis); otherwise another engine moved the session on meanwhile
and the chunk is run again on the newer state. No lock is ever held across
a model run, and a chunk is applied once or not at all.

Keys (one Redis; Redis Cluster would need the keys of a session in one
slot, which we do not arrange):

* ``a2e:s:<session id>``: a hash: ``n``, ``state`` (``engine.session_codec``,
  all but the audio), ``last`` (the last chunk's answer, for retries),
  ``client``, ``frames``, ``first_at`` / ``last_at`` (wall clock), with a TTL
  of the idle timeout, refreshed by every chunk.
* ``a2e:a:<session id>``: a list: the session's recent audio as pieces
  (``session_codec.encode_audio``), oldest first, as many as cover a model window. A chunk appends
  its own audio and drops what no window needs any more, so a write carries
  the chunk's audio, not the whole window again. Same TTL.
* ``a2e:sessions`` and ``a2e:c:<client>``: sorted sets of open session ids
  scored by when they expire, which the limits are counted in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any
import os

from a2e.constants import WINDOW_SAMPLES
from a2e.streaming import StreamState

from runtime.store_address import parse

from . import metrics, redis_connect
from .protocol import ChunkResult, SessionClosed, SessionLimitReached, SessionNotFound, StateUnavailable
from .session_codec import decode_answer, decode_state, piece_samples

try:
    from asyncio import timeout as _deadline  # Python 3.11+
except ImportError:  # 3.10: the package redis-py itself depends on there
    from async_timeout import timeout as _deadline

log = logging.getLogger("a2e.state")

PREFIX = "a2e:"
ALL_SESSIONS = PREFIX + "sessions"
# Longer than any one operation on a healthy store (a chunk's write is ~40 KB,
# a full read ~90 KB): past it the store counts as unreachable and the chunk
# is answered 503.
OPERATION_TIMEOUT_S = 2.0

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: session, all sessions, the client's sessions. ARGV: id, ttl ms,
# max sessions, max per client, state, client.
_CREATE = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return -1 end
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[4]) then return -2 end
local ttl = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'n', 0, 'state', ARGV[5], 'client', ARGV[6], 'frames', 0)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('ZADD', KEYS[3], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[3], ttl)
return 0
"""

# KEYS: session, its audio. ARGV: the n the caller's copy is at (-1: none),
# the chunk's number (0: none). Returns {n, client, state or '' when the copy
# is current, last answer or '' unless the chunk's number is n (a retry),
# the audio pieces (none when the copy is current)}.
_FETCH = """
local v = redis.call('HMGET', KEYS[1], 'n', 'client')
if not v[1] then return false end
local n = tonumber(v[1])
local state, audio = '', {}
if n ~= tonumber(ARGV[1]) then
  state = redis.call('HGET', KEYS[1], 'state')
  audio = redis.call('LRANGE', KEYS[2], 0, -1)
end
local last = ''
if n > 0 and n == tonumber(ARGV[2]) then last = redis.call('HGET', KEYS[1], 'last') or '' end
return {n, v[2], state, last, audio}
"""

# KEYS: session, its audio, all sessions, the client's sessions. ARGV: id,
# the n the chunk was run on, new state, answer, ttl ms, frames sent, first
# chunk's arrival, now (wall clock, s), the chunk's audio, how many audio
# pieces to keep with it (0: it replaces them all), the write's token.
# Returns {'ok', n+1} | {'moved', n} | {'gone', -1}. The token makes the
# write safe to send again (after a failover cut its answer off): a write
# that already landed finds its own token and reports 'ok' again.
_COMMIT = _NOW + """
local v = redis.call('HMGET', KEYS[1], 'n', 'w')
if not v[1] then return {'gone', -1} end
local n = tonumber(v[1])
if n ~= tonumber(ARGV[2]) then
  if n == tonumber(ARGV[2]) + 1 and v[2] == ARGV[11] then return {'ok', n} end
  return {'moved', n}
end
local ttl = tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'n', n + 1, 'state', ARGV[3], 'last', ARGV[4], 'frames', ARGV[6], 'last_at', ARGV[8],
           'w', ARGV[11])
redis.call('HSETNX', KEYS[1], 'first_at', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ttl)
local keep = tonumber(ARGV[10])
if keep == 0 then redis.call('DEL', KEYS[2]) end
if #ARGV[9] > 0 then redis.call('RPUSH', KEYS[2], ARGV[9]) end
if keep > 0 then redis.call('LTRIM', KEYS[2], -keep, -1) end
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('ZADD', KEYS[3], 'XX', now + ttl, ARGV[1])
redis.call('ZADD', KEYS[4], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[4], ttl)
return {'ok', n + 1}
"""

# KEYS: all sessions. Open sessions (expired ones dropped first).
_COUNT = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""


@dataclass
class Fetched:
    chunks_done: int
    client: str
    state: StreamState | None  # None: the caller's copy is current
    last: tuple[ChunkResult, int] | None  # the last chunk's answer and audio digest, when asked for
    audio_pieces: list[int] | None  # with a state: the samples in each of its stored audio pieces


@dataclass
class Commit:
    """One chunk's write: the state it left, run on version ``ran_on``; its
    audio is appended to the stored pieces, of which the newest ``keep`` stay
    (0: ``audio`` replaces them all)."""

    session_id: str
    client: str
    ran_on: int
    state: bytes
    answer: bytes
    frames: int
    first_at: float
    audio: bytes
    keep: int
    token: bytes = field(default_factory=lambda: os.urandom(8))  # the same for every send of this write


def pieces_to_keep(pieces: list[int]) -> int:
    """How many of the newest audio pieces (their sample counts, oldest
    first) a model window needs: the fewest that hold one, or all."""
    total = 0
    for k, samples in enumerate(reversed(pieces), 1):
        total += samples
        if total >= WINDOW_SAMPLES:
            return k
    return len(pieces)


class RedisSessions:
    """Session records in Redis (one server, Sentinel's primary), through
    redis-py's asyncio client (made on first use, on the event loop that
    uses it). An operation that meets a failover is retried on the new
    primary for up to ``failover_s``; with ``ack="replica"`` a chunk's write
    counts only once a replica holds it."""

    shared = True

    def __init__(self, url: str, idle_timeout_s: float, max_sessions: int, max_per_client: int, *,
                 ack: str = "primary", ack_timeout_ms: int = 1000, failover_s: float = 10.0) -> None:  # fmt: skip
        self.url = url
        self.address = parse(url)
        self.ack, self.ack_timeout_ms, self.failover_s = ack, ack_timeout_ms, failover_s
        self.topology: dict[str, Any] = {"mode": self.address.kind}
        self.ttl_ms = int(idle_timeout_s * 1000)
        self.max_sessions = max_sessions
        self.max_per_client = max_per_client
        self._redis: Any = None
        self._scripts: dict[str, Any] = {}
        self.reachable: bool | None = None  # None: not tried yet
        self.detail: str | None = None
        self.latency_ms: float | None = None
        self.sessions: int | None = None
        self._lines: dict[str, redis_connect.Line] = {}

    def _client(self) -> Any:
        if self._redis is None:
            # _run bounds each whole operation, and redis-py drops a connection
            # that an expired deadline cuts short.
            self._redis = redis_connect.client(self.address)
            for name, lua in (("create", _CREATE), ("fetch", _FETCH), ("commit", _COMMIT), ("count", _COUNT)):
                self._scripts[name] = self._redis.register_script(lua)
            # A chunk's read and its batch's write each on a line of their own:
            # a read never waits behind a write.
            self._lines = {op: redis_connect.Line(self._redis.connection_pool) for op in ("fetch", "commit")}
        return self._redis

    async def _scripted(self, op: str, calls: list[tuple[list[str], list]], after: list[tuple] = ()) -> list:
        """``op``'s script once per (keys, args), then the commands ``after``,
        in one round trip on ``op``'s line: each reply or its error. Where
        Redis had lost the script (a restart, a flush, a promoted replica), it
        is loaded and those calls (which ran nothing) sent again, with
        ``after`` again behind them."""
        from redis.exceptions import NoScriptError

        sha = self._scripts[op].sha
        commands = [("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls]
        replies = await self._lines[op].exchange([*commands, *after])
        missing = [i for i, reply in enumerate(replies[: len(commands)]) if isinstance(reply, NoScriptError)]
        if missing:
            await self._redis.script_load(self._scripts[op].script)
            again = await self._lines[op].exchange([*(commands[i] for i in missing), *after])
            for i, reply in zip(missing, again):
                replies[i] = reply
            replies[len(commands) :] = again[len(missing) :]
        return replies

    async def _run(self, op: str, call, nbytes: int = 0) -> Any:
        """One operation, timed and counted. What a failover gives (a dropped
        connection, READONLY, no primary yet) is retried, with a growing
        pause, until ``failover_s`` has passed; then, or for any other store
        error, StateUnavailable. Every operation may run twice: the scripts
        make a second run of one that landed change nothing."""
        from redis.exceptions import RedisError

        self._client()
        started = time.perf_counter()
        give_up, pause = time.monotonic() + self.failover_s, 0.05
        while True:
            try:
                async with _deadline(OPERATION_TIMEOUT_S):
                    result = await call()
                break
            except (RedisError, asyncio.TimeoutError) as exc:
                metrics.STATE_ERRORS.labels(op).inc()
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else f"no answer in {OPERATION_TIMEOUT_S:g} s"
                self._mark(False, reason)
                if redis_connect.passing(exc) and time.monotonic() + pause < give_up:
                    metrics.STATE_RETRIES.labels(op).inc()
                    await asyncio.sleep(pause)
                    pause = min(2 * pause, 0.5)
                    continue
                exc_name = type(exc).__name__
                # A write cut short may still have landed: only its number makes the retry safe.
                outcome = ("the chunk's write may or may not have landed: retry it with its chunk_index (applied once)"
                           if op == "commit" else "the chunk was not applied: retry shortly")  # fmt: skip
                raise StateUnavailable(
                    f"the session store ({self.address.redacted()}) is unreachable ({exc_name}); {outcome}"
                ) from None
        metrics.STATE_SECONDS.labels(op).observe(time.perf_counter() - started)
        if nbytes:
            metrics.STATE_BYTES.labels(op).observe(nbytes)
        self._mark(True, None)
        return result

    def _mark(self, reachable: bool, detail: str | None) -> None:
        if reachable != self.reachable:
            if reachable:
                log.info("session store %s reachable", self.address.redacted())
            else:
                log.warning("session store %s unreachable: %s", self.address.redacted(), detail)
        self.reachable, self.detail = reachable, detail

    # -- the operations -------------------------------------------------------------------
    async def create(self, session_id: str, client: str, state: bytes) -> None:
        keys = [PREFIX + "s:" + session_id, ALL_SESSIONS, PREFIX + "c:" + client]
        args = [session_id, self.ttl_ms, self.max_sessions, self.max_per_client, state, client]
        code = await self._run("create", lambda: self._scripts["create"](keys=keys, args=args), len(state))
        if code == -1:
            raise SessionLimitReached(
                f"the cluster has reached its limit of {self.max_sessions} open streaming sessions; "
                "close finished sessions (DELETE /api/infer_stream_close/{session_id}) or retry later"
            )
        if code == -2:
            raise SessionLimitReached(
                f"this client ({client}) has {self.max_per_client} open streaming sessions, the limit per client "
                "across the cluster; close finished sessions (DELETE /api/infer_stream_close/{session_id}) or retry later"
            )

    async def fetch(self, session_id: str, have: int, chunk_index: int | None) -> Fetched:
        """The session's record, its state only if newer than ``have``."""
        keys = [PREFIX + "s:" + session_id, PREFIX + "a:" + session_id]
        (reply,) = await self._run("fetch", lambda: self._scripted("fetch", [(keys, [have, chunk_index or 0])]))
        if isinstance(reply, Exception):
            raise reply
        if reply is None:
            raise SessionNotFound(f"Session not found: {session_id} (unknown, closed or expired)")
        n, client, state, last, audio = reply
        metrics.STATE_BYTES.labels("fetch").observe(len(state) + len(last) + sum(map(len, audio)))
        if last and self.ack == "replica":
            await self._replica_holds(keys[0])  # a retry's stored answer is given only once a replica has it
        return Fetched(
            int(n), client.decode(), decode_state(state, audio) if state else None,
            decode_answer(last) if last else None, [piece_samples(piece) for piece in audio] if state else None,
        )  # fmt: skip

    async def _replica_holds(self, key: str) -> None:
        """Wait until a replica holds everything written to ``key`` so far: a
        write of nothing new (the TTL again), then WAIT for it; the
        replication stream is in order, so what came before is held too."""
        replies = await self._run("confirm", lambda: self._lines["fetch"].exchange(
            [("PEXPIRE", key, self.ttl_ms), ("WAIT", 1, self.ack_timeout_ms)]))  # fmt: skip
        if isinstance(replies[1], Exception) or int(replies[1]) < 1:
            metrics.STATE_UNACKED.inc()
            raise StateUnavailable(f"no replica of the session store holds this chunk's answer yet (--state-ack replica, "
                                   f"{self.ack_timeout_ms} ms); retry it with its chunk_index")  # fmt: skip

    async def commit(self, writes: list[Commit]) -> list[tuple[str, int] | Exception]:
        """Write the states chunks left, each only if its session is still at
        the ``ran_on`` it was run on: ("ok", n) applied, ("moved", n) another
        engine got there first, ("gone", -1), or the error that write met.
        Several writes (one batch's chunks) go in one round trip."""
        calls = [self._commit_call(w) for w in writes]
        nbytes = sum(len(w.state) + len(w.answer) + len(w.audio) for w in writes)
        replica = self.ack == "replica"
        # WAIT on the same connection, in the same round trip: it returns once
        # a replica holds every write sent before it (or its timeout passed).
        after = [("WAIT", 1, self.ack_timeout_ms)] if replica else []
        replies = await self._run("commit", lambda: self._scripted("commit", calls, after), nbytes)
        if replica:
            held = replies.pop()
            if isinstance(held, Exception) or int(held) < 1:
                metrics.STATE_UNACKED.inc(len(writes))
                unacked = StateUnavailable(
                    f"no replica of the session store confirmed this chunk's write within {self.ack_timeout_ms} ms "
                    "(--state-ack replica); it may be stored: retry it with its chunk_index (applied once)")  # fmt: skip
                return [unacked] * len(writes)
        return [reply if isinstance(reply, Exception) else (reply[0].decode(), int(reply[1])) for reply in replies]

    def _commit_call(self, w: Commit) -> tuple[list[str], list]:
        keys = [PREFIX + "s:" + w.session_id, PREFIX + "a:" + w.session_id, ALL_SESSIONS, PREFIX + "c:" + w.client]
        args = [w.session_id, w.ran_on, w.state, w.answer, self.ttl_ms, w.frames, repr(w.first_at), repr(time.time()),
                w.audio, w.keep, w.token]  # fmt: skip
        return keys, args

    async def position(self, session_id: str) -> tuple[int, StreamState, tuple[ChunkResult, int] | None]:
        key = PREFIX + "s:" + session_id
        n, state, last = await self._run("position", lambda: self._redis.hmget(key, "n", "state", "last"))
        if n is None:
            raise SessionNotFound(f"Session not found: {session_id} (unknown, closed or expired)")
        return int(n), decode_state(state), decode_answer(last) if last else None

    async def close(self, session_id: str) -> SessionClosed | None:
        key = PREFIX + "s:" + session_id
        r = self._client()
        n, frames, first_at, last_at, client = await self._run(
            "close", lambda: r.hmget(key, "n", "frames", "first_at", "last_at", "client")
        )
        if n is None:
            return None

        async def remove() -> list:
            async with r.pipeline(transaction=True) as pipe:
                pipe.delete(key).delete(PREFIX + "a:" + session_id)
                pipe.zrem(ALL_SESSIONS, session_id).zrem(PREFIX + "c:" + client.decode(), session_id)
                return await pipe.execute()

        deleted, _, _, _ = await self._run("close", remove)
        if not deleted:
            return None  # closed by another node meanwhile
        seconds = float(last_at) - float(first_at) if first_at and last_at else 0.0
        return SessionClosed(int(n), int(frames), max(0.0, seconds))

    async def check(self) -> None:
        """Ping the store for /api/health (reachability, latency, open sessions)."""
        started = time.perf_counter()
        try:
            self.sessions = int(await self._run("ping", lambda: self._scripts["count"](keys=[ALL_SESSIONS])))
            self.latency_ms = (time.perf_counter() - started) * 1000
        except StateUnavailable:
            self.latency_ms = self.sessions = None
        from redis.exceptions import RedisError

        try:
            async with _deadline(OPERATION_TIMEOUT_S):
                self.topology = await redis_connect.topology(self._redis, self.address)
        except (RedisError, asyncio.TimeoutError) as exc:
            self.topology = {"mode": self.address.kind, "topology_error": f"{type(exc).__name__}: {exc}"}

    def health(self) -> dict[str, Any]:
        return {
            "store": "redis",
            "url": self.address.redacted(),
            **self.topology,
            "ack": self.ack,
            "reachable": self.reachable,
            "detail": self.detail,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 3),
            "sessions": self.sessions,
        }

    async def aclose(self) -> None:
        for line in self._lines.values():
            await line.aclose()
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
