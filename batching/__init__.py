"""Cross-session micro-batching: the batcher thread (what runs next) and the
model runner (how it runs: eager, or CUDA graphs per bucket size)."""

from .batcher import BatcherStopped, Cancelled, CancelScope, MicroBatcher, QueueFull
from .runner import ModelRunner

__all__ = ["BatcherStopped", "Cancelled", "CancelScope", "MicroBatcher", "ModelRunner", "QueueFull"]
