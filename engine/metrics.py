"""Prometheus metrics of what an engine serves: open sessions and the audio
and frames it animates (the batcher's own are in ``batching/metrics.py``,
the HTTP layer's in ``server/metrics.py``).

Session series carry their engine (see ``batching/metrics.py``); gauges sum
over live processes when several processes share one view (multiprocess mode).
"""

from prometheus_client import Counter, Gauge, Histogram

SESSIONS_ACTIVE = Gauge("a2e_sessions_active", "Open streaming sessions", ["engine"], multiprocess_mode="livesum")
SESSIONS_EXPIRED = Counter("a2e_sessions_expired_total", "Streaming sessions closed for being idle", ["engine"])
AUDIO_SECONDS = Counter("a2e_audio_seconds_total", "Seconds of audio animated", ["kind"])
FRAMES = Counter("a2e_frames_total", "Animation frames produced", ["kind"])
CHUNKS_REPLAYED = Counter(
    "a2e_stream_chunks_replayed_total", "Retried chunks (same chunk_index, same audio) answered again without being applied"
)
# The shared session store (--state redis://...): what each chunk costs in it.
STATE_SECONDS = Histogram(
    "a2e_state_store_seconds",
    "Time of one state-store round trip, from the engine (the writes of one batch's chunks go as one)",
    ["op"],
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5),
)
STATE_BYTES = Histogram(
    "a2e_state_store_bytes",
    "Bytes of session state read or written by one state-store round trip",
    ["op"],
    buckets=(256, 1024, 4096, 16384, 65536, 131072, 262144, 524288, 1048576),
)
STATE_ERRORS = Counter("a2e_state_store_errors_total", "State-store operations that failed (store unreachable or timed out)", ["op"])
STATE_CONFLICTS = Counter(
    "a2e_state_store_conflicts_total", "Chunks whose session another engine moved on while they ran (run again on the newer state)"
)
STATE_RETRIES = Counter(
    "a2e_state_store_retries_total",
    "State-store operations tried again after a failover's error (connection lost, READONLY, no primary yet)", ["op"])
STATE_ROLLBACKS = Counter(
    "a2e_state_store_rollbacks_total",
    "Chunks refused (409) because the store had lost the session's last chunks (a failover to a replica that lacked them)")
STATE_UNACKED = Counter(
    "a2e_state_store_unacked_total", "Chunk writes no replica confirmed within --state-ack-timeout-ms (answered 503)")
