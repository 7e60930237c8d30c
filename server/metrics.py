"""Prometheus metrics of the front doors: requests, connections, uploads and
streams as clients see them, and the one ``/metrics`` view of every process
(the engine's own series are in ``engine/metrics.py``, the batcher's in
``batching/metrics.py``).

Gauges sum over live processes when several processes share one view
(multiprocess mode).
"""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("a2e_http_requests_total", "HTTP requests answered", ["endpoint", "method", "status"])
LATENCY = Histogram(
    "a2e_http_request_duration_seconds",
    "Time from request to response",
    ["endpoint", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
CONNECTIONS_OPEN = Gauge("a2e_http_connections", "Open HTTP connections", multiprocess_mode="livesum")
CONNECTIONS_REFUSED = Counter("a2e_http_connections_refused_total", "Connections refused at the connection cap (none was idle)")
IDLE_CLOSED_AT_CAP = Counter(
    "a2e_http_idle_connections_closed_total", "Idle connections closed to make room for a new one at the connection cap"
)
SLOW_CLIENTS_CUT = Counter("a2e_http_slow_clients_closed_total", "Connections closed for sending headers or body too slowly")
UPLOAD_BYTES_HELD = Gauge(
    "a2e_http_upload_bytes", "Request body bytes admitted to memory (upload budget in use)", multiprocess_mode="livesum"
)
UPLOADS_REFUSED = Counter("a2e_http_uploads_refused_total", "Request bodies refused because the upload budget was spent")
# Like Audio2Face-3D's performance test: how long after the audio that
# completes a frame the frame is sent (the first frame of each answer), and
# the frames per second a stream delivered over its life (observed when it
# ends: REST sessions when closed, WebSocket streams when they finish).
FIRST_FRAME_LATENCY = Histogram(
    "a2e_stream_first_frame_latency_seconds",
    "From the arrival of the audio that completes an answer's first frame to the answer",
    ["transport"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0),
)
STREAM_FPS = Histogram(
    "a2e_stream_frames_per_second",
    "Frames a stream delivered per second, from its first audio to its last answer",
    ["transport"],
    buckets=(5, 10, 15, 20, 25, 28, 29, 29.5, 30, 30.5, 31, 32, 35, 40, 60),
)
STREAM_ANSWERS = Counter(
    "a2e_stream_answers_total", "Streaming answers sent; each that has frames ran one model window per started 2 s of its audio", ["transport"]
)
TLS_REFUSED = Counter(
    "a2e_tls_connections_refused_total",
    "HTTPS-port connections refused before any request: plain HTTP, a failed handshake (no or bad client certificate, old TLS), nothing sent",
    ["reason"],
)
CALLER_REQUESTS = Counter(
    "a2e_client_requests_total",
    "Requests and streams by the name of the key (or client certificate) they showed; never the key",
    ["client", "door"],
)
AUTH_REFUSED = Counter("a2e_auth_refused_total", "Requests and streams refused for missing, wrong or revoked credentials", ["door"])
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
