"""Cross-session micro-batching: the batcher thread (what runs next) and the
model runner (how it runs: eager, or CUDA graphs per bucket size)."""

from .batcher import BatcherStopped, MicroBatcher, QueueFull
from .runner import ModelRunner

__all__ = ["BatcherStopped", "MicroBatcher", "ModelRunner", "QueueFull"]
