"""What the batcher raises: light on purpose (no torch), since the HTTP
workers map these to status codes without ever loading a model."""


class QueueFull(RuntimeError):
    """The batcher's queue is at its bound; retry later."""

    def __init__(self, depth: int, retry_after_s: float) -> None:
        super().__init__(f"inference queue is full ({depth} windows waiting); retry in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class BatcherStopped(RuntimeError):
    """The batcher is not running (shutting down, or never started)."""


class Cancelled(RuntimeError):
    """The request that owned this work was cancelled (client gone, deadline passed)."""
