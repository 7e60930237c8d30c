"""The micro-batcher: one thread that owns the model and the device.

Handlers (any thread, or the event loop) submit work and get a
``concurrent.futures.Future`` back (``asyncio.wrap_future`` makes it awaitable;
a job with a tag, answered through ``on_batch``, gets a lighter
``TaggedResult``):

* ``submit_windows``: streaming windows ``[n, 34133]`` with identities (or
  each window as consecutive parts, e.g. views of a session's audio, which
  are copied once, straight into the batch). Queued window requests are
  coalesced into one batch of up to ``max_batch`` rows in a buffer reused
  from batch to batch, run through the runner (which pads to its captured
  bucket sizes), and the output rows are scattered back to each request's
  future. Jobs submitted
  with a tag are also handed back together, one ``on_batch`` call per batch,
  so a consumer can finish a whole batch with one wake-up of its thread.
* ``submit_clip``: one variable-length whole-clip pass, run as its own job
  by the same thread, so a single owner touches the device.

When the device is idle the thread waits at most ``max_wait_s`` for more
windows to fill a batch; when work is already queued it does not wait. The
queue is bounded (``max_queue`` windows): ``QueueFull`` is raised at once
instead of letting latency grow without limit. A failing batch fails only
its own futures; the thread keeps running.

The batcher also implements the ``a2e.backend.Backend`` protocol (blocking
calls), so the core's clip and streaming paths run through it unchanged.

Admission also bounds time: work is refused when the queue already holds
more than ``max_queue_wait_s`` of estimated model time, so a burst is told to
come back instead of timing out in the queue. A job whose output holds NaN or
infinity fails alone (``ModelOutputError``); no such number leaves the batcher.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from a2e.backend import Backend
from a2e.constants import SAMPLE_RATE, WINDOW_SAMPLES
from a2e.errors import ModelOutputError

from . import metrics
from .errors import BatcherStopped, Cancelled, QueueFull

log = logging.getLogger("a2e.batcher")


Windows = np.ndarray | Sequence[Sequence[np.ndarray]]


class TaggedResult:
    """The outcome of a tagged window job, delivered through ``on_batch``:
    the part of ``concurrent.futures.Future`` that such a consumer uses
    (cancel, cancelled, result, exception), without a condition variable,
    since nobody blocks on it. Cancelling and starting to run are decided
    under the batcher's lock, so a job is either cancelled or run, never both."""

    __slots__ = ("_lock", "_state", "_value", "_error")

    def __init__(self, lock: threading.Condition) -> None:
        self._lock = lock
        self._state = "pending"  # -> "cancelled", or "running" -> "done"
        self._value: np.ndarray | None = None
        self._error: BaseException | None = None

    def cancel(self) -> bool:
        with self._lock:
            if self._state == "pending":
                self._state = "cancelled"
            return self._state == "cancelled"

    def cancelled(self) -> bool:
        return self._state == "cancelled"

    def set_running_or_notify_cancel(self) -> bool:  # (called with the lock held)
        if self._state == "cancelled":
            return False
        self._state = "running"
        return True

    def set_result(self, value: np.ndarray) -> None:
        self._value, self._state = value, "done"

    def set_exception(self, error: BaseException) -> None:
        if self._state != "cancelled":  # (a cancelled job stays cancelled, as with a Future)
            self._error, self._state = error, "done"

    def exception(self) -> BaseException | None:
        return self._error

    def result(self) -> np.ndarray:
        if self._error is not None:
            raise self._error
        return self._value


class _WindowJob:
    __slots__ = ("windows", "identities", "future", "tag", "rows", "enqueued")

    def __init__(self, windows: Windows, identities: np.ndarray, future: Future | TaggedResult, tag: object) -> None:
        self.windows = windows  # [rows, WINDOW_SAMPLES], or rows windows as parts
        self.identities = identities
        self.future = future
        self.tag = tag  # the submitter's, handed back through on_batch
        self.rows = len(windows)
        self.enqueued = time.perf_counter()


@dataclass
class _ClipJob:
    audio: np.ndarray
    identity: int
    future: Future
    stop: threading.Event | None = None  # set: the owner is gone, stop between layers
    enqueued: float = field(default_factory=time.perf_counter)
    rows: int = 1  # in the queue's accounting: the windows' worth of model time it takes


class MicroBatcher:
    def __init__(
        self,
        runner: Backend,
        *,
        max_batch: int = 8,
        max_wait_s: float = 0.005,
        max_queue: int = 512,
        max_queue_wait_s: float = math.inf,
        batch_s: float = 0.0,
        on_batch: Callable[[list[tuple[object, Future]]], None] | None = None,
    ) -> None:  # batch_s: a full batch's time measured at start-up, until full batches have run
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.runner = runner
        self.num_identities = runner.num_identities
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.max_queue_wait_s = max_queue_wait_s
        self.on_batch = on_batch
        self._queue: deque[_WindowJob | _ClipJob] = deque()
        self._queued_rows = 0
        self._cond = threading.Condition()
        # Queued rows at which a submit wakes the batcher thread: 1 while it
        # waits for work, a full batch while it waits for one to fill (one
        # wake-up per batch, not one per submitted chunk, each of which costs
        # a thread switch and the GIL).
        self._wake_rows = 1
        self._thread: threading.Thread | None = None
        self._running = False
        self._busy_s = max(0.0, batch_s)  # recent time of a full batch: admission and Retry-After
        self._batches = 0
        self._staging = np.empty((0, WINDOW_SAMPLES), dtype=np.float32)  # the batch input, reused
        self.windows_run = 0  # with _batches: the mean batch size, for health and benchmarks

    # -- lifecycle -------------------------------------------------------
    def start(self) -> "MicroBatcher":
        with self._cond:
            if self._running:
                return self
            self._running = True
        self._thread = threading.Thread(target=self._loop, name="a2e-batcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._running = False
            pending = list(self._queue)
            self._queue.clear()
            self._queued_rows = 0
            self._cond.notify_all()
        for job in pending:
            if not job.future.cancelled():  # (a cancelled Future takes no exception)
                job.future.set_exception(BatcherStopped("server is shutting down"))
        self._hand_back([j for j in pending if isinstance(j, _WindowJob)])
        if self._thread is not None:
            self._thread.join(timeout)
        metrics.child(metrics.QUEUE_DEPTH).set(0)

    @property
    def running(self) -> bool:
        return self._running

    @property
    def batches_run(self) -> int:
        return self._batches

    @property
    def queued_windows(self) -> int:
        return self._queued_rows

    def estimated_wait_s(self, extra_rows: int = 0) -> float:
        """Model time of what is queued (and ``extra_rows`` more), in full batches."""
        return math.ceil((self._queued_rows + extra_rows) / self.max_batch) * self._busy_s

    # -- submission --------------------------------------------------------
    def _enqueue(self, job: _WindowJob | _ClipJob) -> Future | TaggedResult:
        with self._cond:
            if not self._running:
                raise BatcherStopped("inference is not running")
            # Refused at once when it could not be done within the budget after what is queued (not
            # answered past its deadline); a job alone is always taken (length limits bound its own time).
            done_in_s = self.estimated_wait_s(job.rows)
            if self._queue and (self._queued_rows + job.rows > self.max_queue or done_in_s > self.max_queue_wait_s):
                metrics.child(metrics.REJECTED).inc()
                raise QueueFull(self._queued_rows, max(1.0, self.estimated_wait_s()))
            self._queue.append(job)
            self._queued_rows += job.rows  # (the gauge follows once per batch, in _take)
            if self._queued_rows >= self._wake_rows or isinstance(job, _ClipJob):
                self._cond.notify()
        return job.future

    def submit_windows(self, windows: Windows, identities: np.ndarray, tag: object = None) -> Future | TaggedResult:
        """Queue windows, ``[n, WINDOW_SAMPLES]`` or n windows given as parts
        (float32 pieces adding up to ``WINDOW_SAMPLES``, read when the batch
        is assembled, so they must not change until the future is done);
        their output rows come back through the future, and, for a job with a
        ``tag``, once more with the rest of its batch through ``on_batch``
        (one call per batch)."""
        if isinstance(windows, np.ndarray):
            windows = np.ascontiguousarray(windows, dtype=np.float32)
            if windows.ndim != 2 or windows.shape[1] != WINDOW_SAMPLES or len(windows) == 0:
                raise ValueError(f"windows must be [n>0, {WINDOW_SAMPLES}], got {windows.shape}")
        else:
            if not windows or any(sum(map(len, parts)) != WINDOW_SAMPLES for parts in windows):
                raise ValueError(f"each window's parts must add up to {WINDOW_SAMPLES} samples")
        ids = np.asarray(identities, dtype=np.int64).reshape(-1)
        if len(ids) != len(windows):
            raise ValueError("one identity per window")
        # A tagged job is answered through on_batch: a light result will do.
        return self._enqueue(_WindowJob(windows, ids, Future() if tag is None else TaggedResult(self._cond), tag))

    def submit_clip(self, audio: np.ndarray, identity: int, stop: threading.Event | None = None) -> Future:
        """One whole-clip pass; once ``stop`` is set it ends between layers (``interruptible`` runners)."""
        audio = np.asarray(audio, dtype=np.float32)
        # A pass over N samples costs about what N / WINDOW_SAMPLES windows do.
        rows = max(1, math.ceil(len(audio) / WINDOW_SAMPLES))
        return self._enqueue(_ClipJob(audio, int(identity), Future(), stop, rows=rows))

    # Backend protocol (blocking; call from worker threads, never the event loop).
    def run_windows(self, windows: np.ndarray, identities: np.ndarray) -> np.ndarray:
        return self.submit_windows(windows, identities).result()

    def run_clip(self, audio: np.ndarray, identity: int) -> np.ndarray:
        return self.submit_clip(audio, identity).result()

    # -- the thread ----------------------------------------------------------
    def _take(self) -> list[_WindowJob] | _ClipJob | None:
        """Next unit of work: a clip job, or window jobs filling up to max_batch rows."""
        with self._cond:
            while self._running and not self._queue:
                self._cond.wait()
            if not self._running:
                return None
            first = self._queue[0]
            if isinstance(first, _ClipJob):
                self._queue.popleft()
                self._queued_rows -= first.rows
                metrics.child(metrics.QUEUE_DEPTH).set(self._queued_rows)
                return first
            batch: list[_WindowJob] = []
            rows = 0
            deadline = time.perf_counter() + self.max_wait_s
            while rows < self.max_batch:
                job = self._pop_window_job(self.max_batch - rows if batch else None)
                if job is not None:
                    batch.append(job)
                    rows += job.rows
                    continue
                # Nothing more that fits right now: wait briefly only if the
                # queue is empty (an idle device), never when work is queued.
                remaining = deadline - time.perf_counter()
                if self._queue or remaining <= 0 or not self._running:
                    break
                self._wake_rows = self.max_batch  # the count includes the rows taken so far
                try:
                    self._cond.wait(remaining)
                finally:
                    self._wake_rows = 1
            self._queued_rows -= rows
            metrics.child(metrics.QUEUE_DEPTH).set(self._queued_rows)
            return batch

    def _pop_window_job(self, room: int | None) -> _WindowJob | None:
        """First queued window job that fits in ``room`` rows (any size when None)."""
        for i, job in enumerate(self._queue):
            if isinstance(job, _WindowJob) and (room is None or job.rows <= room):
                del self._queue[i]
                return job
        return None

    def _loop(self) -> None:
        while True:
            work = self._take()
            if work is None:
                return
            if isinstance(work, _ClipJob):
                self._run_clip(work)
            else:
                self._run_batch(work)

    def _run_clip(self, job: _ClipJob) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        metrics.child(metrics.QUEUE_WAIT, "clip").observe(time.perf_counter() - job.enqueued)
        t0 = time.perf_counter()
        try:
            if job.stop is not None and getattr(self.runner, "interruptible", False):
                out = self.runner.run_clip(job.audio, job.identity, stop=job.stop)
            else:
                out = self.runner.run_clip(job.audio, job.identity)
        except Cancelled as exc:  # its owner went away mid-pass
            log.info("whole clip (%.1f s of audio) stopped after %.2f s: its request was cancelled",
                     len(job.audio) / SAMPLE_RATE, time.perf_counter() - t0)  # fmt: skip
            job.future.set_exception(exc)
            return
        except Exception as exc:  # isolate: only this request fails
            log.exception("whole-clip inference failed (%.1f s of audio)", len(job.audio) / SAMPLE_RATE)
            job.future.set_exception(exc)
            return
        metrics.child(metrics.BATCH_SECONDS, "clip").observe(time.perf_counter() - t0)
        if not np.isfinite(out).all():
            log.error("whole-clip inference gave non-finite output (%.1f s of audio)", len(job.audio) / SAMPLE_RATE)
            job.future.set_exception(ModelOutputError("the model produced non-finite values"))
            return
        job.future.set_result(out)

    def _run_batch(self, jobs: list[_WindowJob]) -> None:
        with self._cond:  # (a TaggedResult is cancelled under this lock)
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        now = time.perf_counter()
        for j in jobs:
            metrics.child(metrics.QUEUE_WAIT, "window").observe(now - j.enqueued)
        windows = self._assemble(jobs)
        ids = jobs[0].identities if len(jobs) == 1 else np.concatenate([j.identities for j in jobs])
        t0 = time.perf_counter()
        try:
            out = self.runner.run_windows(windows, ids)
        except Exception as exc:
            log.exception("batch of %d windows failed", len(windows))
            for j in jobs:
                j.future.set_exception(exc)
            self._hand_back(jobs)
            return
        elapsed = time.perf_counter() - t0
        self._batches += 1
        self.windows_run += len(windows)
        if len(windows) >= self.max_batch:
            self._busy_s = elapsed if self._busy_s == 0 else 0.9 * self._busy_s + 0.1 * elapsed
        elif self._busy_s == 0:  # nothing better yet: as if the batch had been full
            self._busy_s = elapsed * self.max_batch / len(windows)
        metrics.child(metrics.BATCH_SECONDS, "window").observe(elapsed)
        metrics.child(metrics.BATCH_SIZE).observe(len(windows))
        finite = np.isfinite(out).all(axis=(1, 2))
        offset = 0
        for j in jobs:
            rows = slice(offset, offset + j.rows)
            offset += j.rows
            if not finite[rows].all():
                log.error("model gave non-finite output for %d of %d windows", j.rows - int(finite[rows].sum()), j.rows)
                j.future.set_exception(ModelOutputError("the model produced non-finite values"))
            else:
                j.future.set_result(out[rows])
        self._hand_back(jobs)

    def _assemble(self, jobs: list[_WindowJob]) -> np.ndarray:
        """The batch's input rows: one job's array as it is, otherwise every
        window copied once into the staging buffer (fresh pages for each
        batch's megabytes would cost more than the copy)."""
        if len(jobs) == 1 and isinstance(jobs[0].windows, np.ndarray):
            return jobs[0].windows
        rows = sum(j.rows for j in jobs)
        if rows > len(self._staging):
            self._staging = np.empty((max(rows, self.max_batch), WINDOW_SAMPLES), dtype=np.float32)
        batch = self._staging[:rows]
        r = 0
        for job in jobs:
            if isinstance(job.windows, np.ndarray):
                batch[r : r + job.rows] = job.windows
                r += job.rows
                continue
            for parts in job.windows:
                row, at = batch[r], 0
                for part in parts:
                    row[at : at + len(part)] = part
                    at += len(part)
                r += 1
        return batch

    def _hand_back(self, jobs: list[_WindowJob]) -> None:
        tagged = [(j.tag, j.future) for j in jobs if j.tag is not None]
        if tagged and self.on_batch is not None:
            try:
                self.on_batch(tagged)
            except Exception:  # the submitter's problem; the thread keeps serving
                log.exception("on_batch failed")


class CancelScope:
    """The batcher as one request sees it: a blocking Backend whose work stops
    when ``cancel()`` is called (from any thread). Queued jobs are dropped;
    a window batch already on the device finishes, and the next call raises
    Cancelled, so a long clip stops between its windows; a single pass in
    progress stops at its next layer."""

    POLL_S = 0.05

    def __init__(self, batcher: MicroBatcher) -> None:
        self.batcher = batcher
        self.num_identities = batcher.num_identities
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _wait(self, future: Future) -> np.ndarray:
        while True:
            if self._cancelled.is_set():
                future.cancel()
                raise Cancelled("the request was cancelled")
            try:
                return future.result(timeout=self.POLL_S)
            except TimeoutError:
                continue

    def run_windows(self, windows: np.ndarray, identities: np.ndarray) -> np.ndarray:
        if self._cancelled.is_set():
            raise Cancelled("the request was cancelled")
        return self._wait(self.batcher.submit_windows(windows, identities))

    def run_clip(self, audio: np.ndarray, identity: int) -> np.ndarray:
        if self._cancelled.is_set():
            raise Cancelled("the request was cancelled")
        return self._wait(self.batcher.submit_clip(audio, identity, stop=self._cancelled))
