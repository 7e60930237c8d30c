"""The micro-batcher and the runner: coalescing, batch-independence of outputs,
isolation of failures, back-pressure, and CUDA graphs where a GPU exists."""

import threading
import time

import numpy as np
import pytest
import torch

from a2e import streaming
from a2e.backend import TorchBackend
from a2e.constants import WINDOW_SAMPLES
from batching import MicroBatcher, ModelRunner, QueueFull
from batching.runner import default_buckets
from tests.conftest import make_model, speech_like


def windows(n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, WINDOW_SAMPLES)) * 0.1).astype(np.float32)


class SlowSpy:
    """A backend that records batch sizes and can be told to fail or stall."""

    def __init__(self, inner, delay=0.0):
        self.inner = inner
        self.num_identities = inner.num_identities
        self.delay = delay
        self.batches: list[int] = []
        self.fail_when = lambda w: False
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set once the batcher thread is inside a batch

    def run_windows(self, w, ids):
        self.entered.set()
        self.gate.wait(5)
        self.batches.append(len(w))
        time.sleep(self.delay)
        if self.fail_when(w):
            raise RuntimeError("device exploded")
        return self.inner.run_windows(w, ids)

    def run_clip(self, audio, identity):
        return self.inner.run_clip(audio, identity)


@pytest.fixture
def runner(model):
    return ModelRunner(make_model(model.dims), "cpu", max_batch=8)


def test_buckets():
    assert default_buckets(8) == [1, 2, 4, 8]
    assert default_buckets(12) == [1, 2, 4, 8, 12]
    assert default_buckets(1) == [1]


def test_batched_equals_unbatched_fp32(runner):
    w = windows(8)
    ids = np.arange(8) % 12
    batched = runner.run_windows(w, ids)
    single = np.concatenate([runner.run_windows(w[i : i + 1], ids[i : i + 1]) for i in range(8)])
    assert batched.shape == (8, 64, 52)
    assert np.abs(batched - single).max() < 1e-5


def test_runner_matches_unfolded_model(model):
    # folding weight norm must not change outputs
    plain = TorchBackend(make_model(model.dims))
    folded = ModelRunner(make_model(model.dims), "cpu")
    w = windows(2, seed=3)
    assert np.abs(plain.run_windows(w, [0, 1]) - folded.run_windows(w, [0, 1])).max() < 1e-5


@pytest.mark.parametrize("dtype,tol", [("bf16", 0.05), ("fp16", 0.01)])
def test_reduced_precision_error_is_bounded(model, dtype, tol):
    exact = ModelRunner(make_model(model.dims), "cpu").run_windows(windows(4), np.zeros(4, int))
    low = ModelRunner(make_model(model.dims), "cpu", dtype=dtype)
    err = np.abs(low.run_windows(windows(4), np.zeros(4, int)) - exact).max()
    assert 0 < err < tol


def test_coalesces_queued_windows(runner):
    spy = SlowSpy(runner)
    spy.gate.clear()  # hold the thread so submissions pile up
    batcher = MicroBatcher(spy, max_batch=8, max_wait_s=0.0).start()
    try:
        first = batcher.submit_windows(windows(1), [0])
        assert spy.entered.wait(5)  # the thread has taken `first` and waits at the gate
        futures = [batcher.submit_windows(windows(1, seed=i), [i % 12]) for i in range(10)]
        spy.gate.set()
        results = [f.result(10) for f in [first] + futures]
    finally:
        batcher.stop()
    assert all(r.shape == (1, 64, 52) for r in results)
    assert spy.batches[0] == 1 and spy.batches[1] == 8 and spy.batches[2] == 2
    # each request got its own rows back
    alone = runner.run_windows(windows(1, seed=4), [4])
    assert np.abs(results[5] - alone).max() < 1e-5


def test_waits_briefly_to_fill_a_batch_when_idle(runner):
    spy = SlowSpy(runner)
    batcher = MicroBatcher(spy, max_batch=4, max_wait_s=0.2).start()
    try:
        futures = []
        for i in range(3):
            futures.append(batcher.submit_windows(windows(1, seed=i), [0]))
            time.sleep(0.01)
        for f in futures:
            f.result(10)
    finally:
        batcher.stop()
    assert spy.batches == [3]


def test_failing_batch_fails_only_its_requests(runner):
    spy = SlowSpy(runner)
    spy.fail_when = lambda w: bool(np.any(w[:, 0] == 42.0))
    batcher = MicroBatcher(spy, max_batch=1, max_wait_s=0.0).start()
    try:
        bad = windows(1)
        bad[0, 0] = 42.0
        f_bad = batcher.submit_windows(bad, [0])
        f_good = batcher.submit_windows(windows(1), [0])
        with pytest.raises(RuntimeError, match="exploded"):
            f_bad.result(10)
        assert f_good.result(10).shape == (1, 64, 52)
        assert batcher.running  # the thread survived
        assert batcher.submit_windows(windows(1), [1]).result(10).shape == (1, 64, 52)
    finally:
        batcher.stop()


def test_bounded_queue_refuses_at_once(runner):
    spy = SlowSpy(runner)
    spy.gate.clear()
    batcher = MicroBatcher(spy, max_batch=2, max_wait_s=0.0, max_queue=4).start()
    try:
        held = batcher.submit_windows(windows(1), [0])
        assert spy.entered.wait(5)
        queued = [batcher.submit_windows(windows(1), [0]) for _ in range(4)]
        t0 = time.perf_counter()
        with pytest.raises(QueueFull) as info:
            batcher.submit_windows(windows(1), [0])
        assert time.perf_counter() - t0 < 0.1
        assert info.value.retry_after_s >= 1
        spy.gate.set()
        for f in [held] + queued:
            f.result(10)
    finally:
        batcher.stop()


def wait_until(condition, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


class InputSpy:
    """A backend that keeps a copy of every batch input it is given."""

    num_identities = 12

    def __init__(self):
        self.inputs: list[np.ndarray] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def run_windows(self, w, ids):
        self.entered.set()
        self.gate.wait(5)
        self.inputs.append(np.array(w))
        return np.repeat(w[:, :64, None], 52, axis=2)  # rows that tell which window they came from

    def run_clip(self, audio, identity):
        raise NotImplementedError


@pytest.fixture
def held():
    """A batcher whose thread holds a first batch at the spy's gate, so the
    jobs a test submits next queue up into one batch; and its hand-backs."""
    spy = InputSpy()
    spy.gate.clear()
    handed_back = []
    batcher = MicroBatcher(spy, max_batch=8, max_wait_s=0.0, on_batch=handed_back.append).start()
    first = batcher.submit_windows(windows(1, seed=9), [0])
    assert spy.entered.wait(5)
    yield spy, batcher, handed_back, first
    batcher.stop()


def test_windows_given_as_parts_are_assembled_into_the_batch_as_given(held):
    spy, batcher, handed_back, first = held
    whole = windows(3, seed=1)
    # Each window in uneven parts, as a session's context and chunk give them.
    parts = [(w[:100], w[100:20000], w[20000:]) for w in whole]
    as_parts = batcher.submit_windows(parts, [0, 1, 2], tag="parts")
    as_array = batcher.submit_windows(windows(2, seed=2), [3, 4], tag="array")
    untagged = batcher.submit_windows(windows(1, seed=3), [5])
    spy.gate.set()
    first.result(10), untagged.result(10)
    assert wait_until(lambda: handed_back)  # the tagged ones are answered through on_batch
    batch = spy.inputs[1]
    assert np.array_equal(batch, np.concatenate([whole, windows(2, seed=2), windows(1, seed=3)]))
    assert [tag for tag, _ in handed_back[0]] == ["parts", "array"]  # one hand-back, tagged jobs only
    assert np.array_equal(as_parts.result()[:, :, 0], whole[:, :64])
    assert np.array_equal(as_array.result()[:, :, 0], windows(2, seed=2)[:, :64])
    with pytest.raises(ValueError, match="add up to"):
        batcher.submit_windows([(whole[0][:100],)], [0], tag="short")


def test_a_tagged_job_cancelled_while_queued_is_not_run(held):
    spy, batcher, handed_back, _ = held
    dropped = batcher.submit_windows(windows(1, seed=5), [0], tag="dropped")
    kept = batcher.submit_windows(windows(1, seed=6), [0], tag="kept")
    assert dropped.cancel() and dropped.cancelled()
    spy.gate.set()
    assert wait_until(lambda: handed_back)
    assert np.array_equal(spy.inputs[1], windows(1, seed=6))  # only the kept job's window ran
    assert [tag for tag, _ in handed_back[0]] == ["kept"] and kept.exception() is None
    assert not kept.cancel()  # done: too late to cancel


def test_clip_jobs_share_the_thread(runner, english_16k):
    batcher = MicroBatcher(runner, max_batch=4).start()
    try:
        clip_future = batcher.submit_clip(english_16k[:32000], 0)
        win_future = batcher.submit_windows(windows(2), [0, 1])
        assert clip_future.result(10).shape == (60, 52)
        assert win_future.result(10).shape == (2, 64, 52)
    finally:
        batcher.stop()


def test_streams_through_the_batcher_equal_direct(runner):
    """Many sessions at once: outputs do not depend on what shares their batch."""
    audio = [speech_like(3.0, seed=s) for s in range(6)]
    direct = []
    for s, a in enumerate(audio):
        st = streaming.StreamState(identity=s, rng=np.random.default_rng(s))
        direct.append([streaming.push_chunk(st, runner, a[i : i + 16000]) for i in range(0, 48000, 16000)])
    batcher = MicroBatcher(runner, max_batch=8, max_wait_s=0.01).start()
    try:
        states = [streaming.StreamState(identity=s, rng=np.random.default_rng(s)) for s in range(6)]
        got = [[] for _ in audio]

        def session(s):
            for i in range(0, 48000, 16000):
                got[s].append(streaming.push_chunk(states[s], batcher, audio[s][i : i + 16000]))

        threads = [threading.Thread(target=session, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        batcher.stop()
    for d, g in zip(direct, got):
        for a, b in zip(d, g):
            assert np.abs(a - b).max() < 1e-5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_match_eager(model):
    eager = ModelRunner(make_model(model.dims), "cpu")
    graphs = ModelRunner(make_model(model.dims), "cuda", max_batch=8, cuda_graphs=True)
    assert graphs.mode == "cuda_graphs" and sorted(graphs.graphs) == [1, 2, 4, 8]
    for n in (1, 3, 8, 11):
        w = windows(n, seed=n)
        ids = np.arange(n) % 12
        assert np.abs(graphs.run_windows(w, ids) - eager.run_windows(w, ids)).max() < 1e-4
