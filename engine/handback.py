"""The batch hand-back: how a finished batch of streaming windows comes back
from the batcher thread and becomes answers.

Streaming chunks need no coroutine each: the batcher hands every finished
batch back in one call (``batch_done``, on its thread), which wakes each
event loop that has chunks in it once; there ``finish_batch`` post-processes
the batch's chunks together (``a2e.streaming.finish_chunks``), answers
them, and starts each session's next chunk.

It owns nothing: sessions and chunks are ``engine.streams``'s, and what a
chunk's frames are is ``a2e.streaming``'s.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import numpy as np

from a2e import streaming
from a2e.errors import ModelOutputError
from batching.batcher import TaggedResult

from .streams import STREAM_FRAMES, STREAM_SECONDS, StreamChunk, Streams

log = logging.getLogger("a2e.service")


def batch_done(streams: Streams, finished: list[tuple[object, TaggedResult]]) -> None:
    """The batcher thread's hand-back: one wake-up of each event loop per batch."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for chunk, future in finished:
        if isinstance(chunk, StreamChunk):
            by_loop.setdefault(chunk.loop, []).append((chunk, future))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(finish_batch, streams, items)
        except RuntimeError:
            pass  # that loop is closed: nobody awaits these chunks any more


def finish_batch(streams: Streams, items: list[tuple[StreamChunk, TaggedResult]]) -> None:
    """Post-process the chunks of one batch together (on their event loop,
    the one thread that touches session state), answer each, and start
    each session's next chunk."""
    ready: list[tuple[StreamChunk, list[np.ndarray]]] = []
    for chunk, future in items:
        if chunk.session.active is not chunk:
            continue  # already undone (cancelled while queued)
        if chunk.replied or future.cancelled():
            streams.abandon(chunk)
        elif future.exception() is not None:
            streams.fail(chunk, future.exception())
        else:
            ready.append((chunk, future.result()))
    if not ready:
        return
    parts: dict[int, list[np.ndarray]] = {id(c): [] for c, _ in ready}
    try:
        # Window k of every chunk in one call: a chunk's windows follow each other.
        for k in range(max(len(c.plans) for c, _ in ready)):
            round_ = [(c, out[k]) for c, out in ready if k < len(c.plans)]
            finished = streaming.finish_chunks([(c.session.state, c.plans[k], out) for c, out in round_])
            for (c, _), frames in zip(round_, finished):
                parts[id(c)].append(frames)
    except Exception as exc:
        log.exception("post-processing a batch of %d chunks failed", len(ready))
        for chunk, _ in ready:
            streams.fail(chunk, exc)
        return
    now, seconds, frame_count = time.monotonic(), 0.0, 0
    for chunk, _ in ready:
        p = parts[id(chunk)]
        frames = p[0] if len(p) == 1 else np.concatenate(p)
        if not math.isfinite(frames.sum()):  # (frames lie in [0, 1]: a sum is only non-finite through a NaN or inf)
            streams.fail(chunk, ModelOutputError("post-processing produced non-finite values"))
        else:
            seconds += streams.succeed(chunk, frames, now)
            frame_count += len(frames)
            streams.start_next(chunk.session)
    STREAM_SECONDS.inc(seconds)
    STREAM_FRAMES.inc(frame_count)
