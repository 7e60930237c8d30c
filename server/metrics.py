"""Prometheus metrics of the HTTP layer and sessions (the batcher's are in batching/metrics.py).

Session series carry their engine (see batching/metrics.py); gauges sum over
live processes when several processes share one view (multiprocess mode).
"""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("a2e_http_requests_total", "HTTP requests answered", ["endpoint", "method", "status"])
LATENCY = Histogram(
    "a2e_http_request_duration_seconds",
    "Time from request to response",
    ["endpoint", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
SESSIONS_ACTIVE = Gauge("a2e_sessions_active", "Open streaming sessions", ["engine"], multiprocess_mode="livesum")
SESSIONS_EXPIRED = Counter("a2e_sessions_expired_total", "Streaming sessions closed for being idle", ["engine"])
AUDIO_SECONDS = Counter("a2e_audio_seconds_total", "Seconds of audio animated", ["kind"])
FRAMES = Counter("a2e_frames_total", "Animation frames produced", ["kind"])
CONNECTIONS_OPEN = Gauge("a2e_http_connections", "Open HTTP connections", multiprocess_mode="livesum")
CONNECTIONS_REFUSED = Counter("a2e_http_connections_refused_total", "Connections refused at the connection cap")
SLOW_CLIENTS_CUT = Counter("a2e_http_slow_clients_closed_total", "Connections closed for sending headers or body too slowly")
UPLOAD_BYTES_HELD = Gauge(
    "a2e_http_upload_bytes", "Request body bytes admitted to memory (upload budget in use)", multiprocess_mode="livesum"
)
UPLOADS_REFUSED = Counter("a2e_http_uploads_refused_total", "Request bodies refused because the upload budget was spent")
CLIENT_DISCONNECTS = Counter(
    "a2e_http_client_disconnects_total", "Requests whose client went away before the answer", ["endpoint"]
)


def exposition() -> bytes:
    """All metrics in Prometheus' text format: this process's, or with
    PROMETHEUS_MULTIPROC_DIR set (several processes), all processes' together."""
    import os

    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)
