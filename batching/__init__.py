"""Cross-session micro-batching: the batcher thread (what runs next) and the
model runner (how it runs: eager, or CUDA graphs per bucket size).

The errors load eagerly; the batcher and runner (which need torch) only when
first used, so HTTP worker processes, which never run a model, start fast.
"""

from .errors import BatcherStopped, Cancelled, QueueFull

__all__ = ["BatcherStopped", "Cancelled", "CancelScope", "MicroBatcher", "ModelRunner", "QueueFull"]


def __getattr__(name: str):
    if name in ("MicroBatcher", "CancelScope"):
        from . import batcher

        return getattr(batcher, name)
    if name == "ModelRunner":
        from .runner import ModelRunner

        return ModelRunner
    raise AttributeError(name)
