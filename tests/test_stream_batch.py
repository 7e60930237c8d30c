"""Streaming post-processing over a batch of sessions gives every session
exactly what it gets alone (issue 10: the engine finishes a batch's chunks
together)."""

import numpy as np
import pytest
from scipy.signal import savgol_filter

from a2e import postprocess as pp
from a2e import streaming
from a2e.constants import BLINK_LENGTH, EYE_BLINK_LEFT, EYE_BLINK_RIGHT, SYMMETRIC_PAIRS, WINDOW_FRAMES, WINDOW_SAMPLES
from tests.conftest import speech_like


def one_chunk_as_written(previous, previous_volume, new, new_volume, rng):
    """The per-chunk pipeline written out plainly, one session, 2-D arrays,
    the way it read before batching (an independent statement to compare with)."""
    if previous is None:
        frames, volume, p = new.copy(), new_volume, 0
    else:
        frames, volume, p = np.concatenate([previous, new]), np.concatenate([previous_volume, new_volume]), len(previous)
    frames = pp.damp_silent_mouth(frames, volume, p)
    ref, window = (frames[p - 1].copy(), 5) if p else (np.zeros_like(frames[0]), 3)
    k = min(window, len(frames) - p)
    for i in range(k):
        w = (i + 1) / (k + 1)
        frames[p + i] = ref * (1 - w) + frames[p + i] * w
    frames = np.clip(savgol_filter(frames.astype(np.float64), 5, 2, axis=0, mode="mirror"), 0, 1).astype(np.float32)
    left, right = SYMMETRIC_PAIRS[:, 0], SYMMETRIC_PAIRS[:, 1]
    mean = (frames[:, left] + frames[:, right]) / 2
    frames[:, left], frames[:, right] = mean, mean
    n = len(frames)
    if n - p > BLINK_LENGTH:
        seen = np.flatnonzero(frames[:p, EYE_BLINK_LEFT] > 0.5)
        since = p - 1 - int(seen[-1]) if seen.size else p
        first = max(0, int(rng.integers(40, 100)) - since)
        if first <= n - p - BLINK_LENGTH:
            start = p + first
            pp._write_blink(frames, start, rng)
            end = start + BLINK_LENGTH
            gap = int(rng.integers(40, 100))
            if n - end - BLINK_LENGTH > gap:
                pp._write_blink(frames, end + gap, rng)
    return frames[p:]


def random_case(seed, p, n):
    rng = np.random.default_rng(seed)
    prev = rng.random((p, 52)).astype(np.float32) if p else None
    if p:
        prev[:, [EYE_BLINK_LEFT, EYE_BLINK_RIGHT]] *= 0.4  # no blink, unless one is planted:
        if seed % 2:
            prev[rng.integers(p), [EYE_BLINK_LEFT, EYE_BLINK_RIGHT]] = 0.9  # a blink somewhere in the stored frames
    new = rng.random((n, 52)).astype(np.float32)
    volume = (rng.random(p + n) * 0.05).astype(np.float32)
    quiet = rng.integers(0, p + n)
    volume[quiet : quiet + rng.integers(0, 20)] = 0.0  # a silent run, sometimes long enough
    return prev, (volume[:p] if p else None), new, volume[p:]


@pytest.mark.parametrize("p,n", [(0, 1), (0, 30), (30, 30), (64, 3), (64, 30), (64, 60), (64, 1)])
def test_postprocess_chunk_matches_the_pipeline_as_written(p, n):
    for seed in range(12):
        prev, pvol, new, vol = random_case(seed, p, n)
        got = pp.postprocess_chunk(prev, pvol, new, vol, np.random.default_rng(seed))
        want = one_chunk_as_written(prev, pvol, new, vol, np.random.default_rng(seed))
        assert np.array_equal(got, want)


def test_silent_runs_at_the_chunk_boundary_damp_and_blend_as_in_the_whole_pipeline():
    # postprocess_chunks reads only the last few stored frames; a silent run
    # that ends anywhere around the boundary (its blend out reads forward) or
    # starts there, first in its row or not, must still give what the whole
    # pipeline gives.
    p, n = 64, 30
    for end in range(p - 10, p + 6):
        for length in (7, 8, 12, 40):
            for earlier_run in (False, True):
                prev, pvol, new, vol = random_case(end * 7 + length, p, n)
                volume = np.full(p + n, 0.05, dtype=np.float32)
                volume[max(end - length, 0) : end] = 0.0
                if earlier_run:
                    volume[2:12] = 0.0  # another run first in the row: the quirk counts that one short instead
                pvol, vol = volume[:p], volume[p:]
                got = pp.postprocess_chunk(prev, pvol, new, vol, np.random.default_rng(end))
                want = one_chunk_as_written(prev, pvol, new, vol, np.random.default_rng(end))
                assert np.array_equal(got, want), (end, length, earlier_run)


@pytest.mark.parametrize("p,n", [(0, 30), (64, 30), (64, 7), (40, 45)])
def test_postprocess_chunks_rows_equal_their_sessions_alone(p, n):
    cases = [random_case(100 + b, p, n) for b in range(9)]
    stack = lambda i: None if cases[0][i] is None else np.stack([c[i] for c in cases])  # noqa: E731
    batch = pp.postprocess_chunks(stack(0), stack(1), stack(2), stack(3), [np.random.default_rng(b) for b in range(9)])
    for b, (prev, pvol, new, vol) in enumerate(cases):
        assert np.array_equal(batch[b], pp.postprocess_chunk(prev, pvol, new, vol, np.random.default_rng(b)))
    if p and n > 2 * BLINK_LENGTH:  # blinks were drawn: a row given another row's generator comes out different
        prev, pvol, new, vol = cases[0]
        others = [pp.postprocess_chunk(prev, pvol, new, vol, np.random.default_rng(b)) for b in range(1, 9)]
        assert any(not np.array_equal(batch[0], o) for o in others)


def test_damping_a_batch_equals_damping_each_row():
    rng = np.random.default_rng(11)
    for _ in range(40):
        b, t = int(rng.integers(1, 12)), int(rng.integers(8, 130))
        frames = rng.random((b, t, 52)).astype(np.float32)
        volume = np.where(rng.random((b, t)) < rng.random(), 0.0, 0.1).astype(np.float32)
        p = int(rng.integers(0, t))
        batch = pp.damp_silent_mouth(frames, volume, p)
        for row in range(b):
            assert np.array_equal(batch[row], pp.damp_silent_mouth(frames[row], volume[row], p))


def sessions(count):
    return [streaming.StreamState(identity=0, rng=np.random.default_rng(s)) for s in range(count)]


def test_finish_chunks_over_a_batch_equals_one_session_at_a_time():
    # Sessions at different points (first chunk, short, long, multi-window),
    # so several shape groups meet in each batch.
    sizes = [[16000] * 6, [8000, 533, 16000, 40000, 16000], [320] * 8, [24000, 16000, 4000, 16000, 16000]]
    audio = [speech_like(sum(s) / 16000 + 0.1, seed=i) * (0.02 if i == 2 else 1.0) for i, s in enumerate(sizes)]
    rng = np.random.default_rng(7)
    batched, alone = sessions(len(sizes)), sessions(len(sizes))
    got = [[] for _ in sizes]
    want = [[] for _ in sizes]
    for r in range(max(len(s) for s in sizes)):
        live = [i for i, s in enumerate(sizes) if r < len(s)]
        work = {}
        for i in live:
            start = sum(sizes[i][:r])
            chunk = audio[i][start : start + sizes[i][r]]
            plans_b = streaming.plan_chunk(batched[i], chunk)
            plans_a = streaming.plan_chunk(alone[i], chunk)
            model = [rng.random((WINDOW_FRAMES, 52)).astype(np.float32) for _ in plans_b]
            want[i].append(np.concatenate([streaming.finish_chunk(alone[i], p, o) for p, o in zip(plans_a, model)] or [np.zeros((0, 52), np.float32)]))
            work[i] = (plans_b, model)
        parts = {i: [] for i in live}
        for k in range(max(len(w[0]) for w in work.values())):  # (a 20 ms chunk may complete no frame: no window)
            items = [(batched[i], work[i][0][k], work[i][1][k]) for i in live if k < len(work[i][0])]
            for (state, _, _), out in zip(items, streaming.finish_chunks(items)):
                parts[batched.index(state)].append(out)
        for i in live:
            got[i].append(np.concatenate(parts[i] or [np.zeros((0, 52), np.float32)]))
    for i in range(len(sizes)):
        for g, w in zip(got[i], want[i]):
            assert np.array_equal(g, w)
        b, a = batched[i], alone[i]
        assert b.frames_sent == a.frames_sent
        assert np.array_equal(b.previous_frames, a.previous_frames)
        assert np.array_equal(b.previous_volume, a.previous_volume)
        assert b.rng.bit_generator.state == a.rng.bit_generator.state


def test_a_session_holds_no_view_of_a_long_chunk_or_of_its_batch():
    # A session's memory stays its own: its context must not pin a long
    # chunk's whole array (or a clip it is a slice of), and its stored frames
    # must not pin the batch's arrays, which an idle session would otherwise
    # keep alive.
    clip = speech_like(14.0, seed=3)
    states = sessions(3)
    for state in states:
        streaming.plan_chunk(state, clip[:16000])  # a slice of a larger array
        assert not any(np.shares_memory(p, clip) for p in state.context)
    long_chunk = clip[16000 : 16000 + 160000].copy()  # 10 s: five 2 s pieces, views of it
    plans = streaming.plan_chunk(states[0], long_chunk)
    assert len(plans) == 5 and not any(np.shares_memory(p, long_chunk) for p in states[0].context)
    assert sum(map(len, states[0].context)) >= WINDOW_SAMPLES
    assert np.array_equal(states[0].previous_audio, clip[176000 - WINDOW_SAMPLES : 176000])
    owned = clip[16000:32000].copy()
    streaming.plan_chunk(states[1], owned)
    assert any(p is owned for p in states[1].context)  # an array of its own is kept without a copy
    rng = np.random.default_rng(1)
    for _ in range(2):  # the second round has stored frames
        plans = [streaming.plan_chunk(s, clip[:8000].copy())[0] for s in states]
        streaming.finish_chunks([(s, p, rng.random((WINDOW_FRAMES, 52)).astype(np.float32)) for s, p in zip(states, plans)])
        for a in range(3):
            for b in range(a + 1, 3):
                assert not np.shares_memory(states[a].previous_frames, states[b].previous_frames)
                assert not np.shares_memory(states[a].previous_volume, states[b].previous_volume)


@pytest.mark.parametrize("n", [1, 100, 533, 8000, 16000, 31999])
def test_volume_of_a_batch_equals_each_piece_alone(n):
    from a2e.audio import rms_volume

    pieces = (np.random.default_rng(n).standard_normal((7, n)) * 0.3).astype(np.float32)
    batch = rms_volume(pieces, 16000, frame_length=min(533, n))
    for row, piece in zip(batch, pieces):
        assert np.array_equal(row, rms_volume(piece, 16000, frame_length=min(533, n)))
    assert np.array_equal(rms_volume(list(pieces), 16000, frame_length=min(533, n)), batch)
