"""Prometheus metrics of the batcher and runner (names with units, as Prometheus expects).

Every series carries the ``engine`` it comes from (its index; "0" in a single
process), so one /metrics view over several engine processes (prometheus
multiprocess mode) still tells them apart. Gauges sum over live processes.
"""

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# This process's engine, set once by engine.process before anything is recorded.
engine = "0"


def set_engine(name: str) -> None:
    global engine
    engine = name
    _children.clear()


_children: dict = {}


def child(metric, *labels: str):
    """``metric.labels(engine, *labels)``, looked up once (it is on every batch's path)."""
    key = (metric, labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(engine, *labels)
    return found


QUEUE_DEPTH = Gauge(
    "a2e_queue_windows", "Windows waiting for the batcher (as of its latest batch)", ["engine"], multiprocess_mode="livesum"
)
QUEUE_WAIT = Histogram(
    "a2e_queue_wait_seconds", "Time a job waited in the batcher's queue", ["engine", "kind"], buckets=_LATENCY_BUCKETS
)
BATCH_SECONDS = Histogram(
    "a2e_batch_run_seconds",
    "Model time of one batch (window) or one clip pass",
    ["engine", "kind"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "a2e_batch_windows",
    "Windows per model batch (before padding)",
    ["engine"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
PADDED_ROWS = Counter("a2e_batch_padding_windows_total", "Padding rows added to reach a captured batch size", ["engine"])
GRAPH_REPLAYS = Counter("a2e_cuda_graph_replays_total", "CUDA graph replays", ["engine"])
REJECTED = Counter("a2e_queue_rejected_total", "Submissions refused because the queue was full", ["engine"])
