"""Prometheus metrics of what an engine serves: open sessions and the audio
and frames it animates (the batcher's own are in ``batching/metrics.py``,
the HTTP layer's in ``server/metrics.py``).

Session series carry their engine (see ``batching/metrics.py``); gauges sum
over live processes when several processes share one view (multiprocess mode).
"""

from prometheus_client import Counter, Gauge

SESSIONS_ACTIVE = Gauge("a2e_sessions_active", "Open streaming sessions", ["engine"], multiprocess_mode="livesum")
SESSIONS_EXPIRED = Counter("a2e_sessions_expired_total", "Streaming sessions closed for being idle", ["engine"])
AUDIO_SECONDS = Counter("a2e_audio_seconds_total", "Seconds of audio animated", ["kind"])
FRAMES = Counter("a2e_frames_total", "Animation frames produced", ["kind"])
