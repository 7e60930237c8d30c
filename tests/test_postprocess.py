"""Each post-processing step against hand-computed expectations."""

import numpy as np
import pytest
from scipy.signal import savgol_filter

from a2e import postprocess as pp
from a2e.constants import BLINK_PATTERNS, MOUTH_GROUP, SYMMETRIC_PAIRS, channel_index

JAW = channel_index("jawOpen")
BROW_INNER = channel_index("browInnerUp")
EYE = channel_index("eyeSquintLeft")  # not in the mouth group, not a blink channel


def frames(n, value=0.5):
    return np.full((n, 52), value, dtype=np.float32)


# -- silence detection -------------------------------------------------------


def test_first_run_is_counted_one_short():
    loud, quiet = 1.0, 0.0
    # first run: 7 quiet frames -> counted as 6 -> ignored; later run of 7 -> kept
    vol = np.array([quiet] * 7 + [loud] * 3 + [quiet] * 7 + [loud])
    runs = pp.find_silent_runs(vol)
    assert [r.tolist() for r in runs] == [list(range(10, 17))]
    # a first run of 8 is long enough
    vol = np.array([quiet] * 8 + [loud])
    assert [r.tolist() for r in pp.find_silent_runs(vol)] == [list(range(8))]


def test_runs_shorter_than_seven_are_ignored():
    vol = np.array([1.0] + [0.0] * 6 + [1.0] + [0.0] * 6 + [1.0])
    assert pp.find_silent_runs(vol) == []


def test_first_quiet_run_need_not_start_at_frame_zero():
    vol = np.array([1.0] * 3 + [0.0] * 7 + [1.0])
    assert pp.find_silent_runs(vol) == []  # still the first run: counted as 6


# -- mouth damping ---------------------------------------------------------------


def test_damping_scales_mouth_only_and_blends_edges():
    n = 20
    x = frames(n, 0.5)
    x[:, EYE] = 0.3
    vol = np.ones(n)
    vol[5:14] = 0.0  # first run, 9 frames -> counted 8 -> qualifies
    out = pp.damp_silent_mouth(x, vol, processed_frames=0)
    assert np.array_equal(x, frames(n, 0.5) * 0 + x)  # input untouched
    # interior frame: mouth x0.1, others unchanged
    assert out[9, JAW] == pytest.approx(0.05)
    assert out[9, EYE] == pytest.approx(0.3)
    # start blend, k=3: frame 5+i = pre*(1-w) + damped*w, w=(i+1)/4
    for i in range(3):
        w = (i + 1) / 4
        assert out[5 + i, JAW] == pytest.approx(0.5 * (1 - w) + 0.05 * w)
    # end blend: frame 13-i = post*(1-w) + damped*w
    for i in range(3):
        w = (i + 1) / 4
        assert out[13 - i, JAW] == pytest.approx(0.5 * (1 - w) + 0.05 * w)
    # outside the run untouched
    assert out[4, JAW] == 0.5 and out[14, JAW] == 0.5
    assert set(MOUTH_GROUP.tolist()) >= {JAW}


def test_damping_start_blend_never_reaches_before_processed_frames():
    n = 20
    x = frames(n, 0.5)
    vol = np.ones(n)
    vol[6:16] = 0.0
    out = pp.damp_silent_mouth(x, vol, processed_frames=8)
    # start blend length = min(3, 6 - 8) <= 0: no blend, frames 6.. damped plainly
    assert out[6, JAW] == pytest.approx(0.05)
    assert out[7, JAW] == pytest.approx(0.05)
    # end blend still happens
    assert out[15, JAW] == pytest.approx(0.5 * 0.75 + 0.05 * 0.25)


def test_damping_run_at_very_start_and_end():
    n = 10
    x = frames(n, 0.4)
    vol = np.zeros(n)  # one run covering everything: counted 9 >= 7
    out = pp.damp_silent_mouth(x, vol, 0)
    # no frame before the run or after it: no blending anywhere
    assert np.allclose(out[:, JAW], 0.04)


def test_damping_without_silence_is_identity():
    x = np.random.default_rng(0).random((30, 52)).astype(np.float32)
    assert np.array_equal(pp.damp_silent_mouth(x, np.ones(30), 0), x)


# -- frame blending --------------------------------------------------------------


def test_first_chunk_blends_three_frames_from_zero():
    x = frames(6, 0.8)
    out = pp.blend_chunk_start(x, 0)
    assert out[:4, JAW].tolist() == pytest.approx([0.8 * 0.25, 0.8 * 0.5, 0.8 * 0.75, 0.8])


def test_next_chunk_blends_five_frames_from_last_previous():
    x = frames(12, 0.8)
    x[:4] = 0.2  # previous frames
    out = pp.blend_chunk_start(x, 4)
    expected = [0.2 * (1 - w) + 0.8 * w for w in np.arange(1, 6) / 6]
    assert out[4:9, JAW].tolist() == pytest.approx(expected)
    assert out[9, JAW] == pytest.approx(0.8)
    assert np.array_equal(out[:4], x[:4])


def test_blend_window_shrinks_for_short_chunks():
    x = frames(5, 0.6)
    x[:3] = 0.0
    out = pp.blend_chunk_start(x, 3)  # 2 new frames: k=2, weights 1/3, 2/3
    assert out[3:, JAW].tolist() == pytest.approx([0.2, 0.4])
    one = pp.blend_chunk_start(frames(1, 0.9), 0)  # single frame: weight 1/2
    assert one[0, JAW] == pytest.approx(0.45)


# -- smoothing and symmetry --------------------------------------------------


def test_savgol_matches_scipy_mirror_and_clips():
    rng = np.random.default_rng(1)
    x = rng.random((40, 52)).astype(np.float32) * 1.4 - 0.2
    out = pp.savgol_smooth(x)
    expected = np.clip(savgol_filter(x.astype(np.float64), 5, 2, axis=0, mode="mirror"), 0, 1)
    assert out.dtype == np.float32
    assert np.allclose(out, expected, atol=1e-7)
    assert out.min() >= 0 and out.max() <= 1


def test_savgol_keeps_a_quadratic_and_handles_one_frame():
    t = np.linspace(0, 1, 20)[:, None]
    x = np.repeat(0.1 + 0.3 * t + 0.2 * t**2, 52, axis=1)
    # a degree-2 polynomial passes through unchanged away from the edges
    assert np.allclose(pp.savgol_smooth(x)[2:-2], x[2:-2], atol=1e-12)
    one = np.full((1, 52), 0.3, dtype=np.float32)
    assert np.allclose(pp.savgol_smooth(one), one)


def test_symmetrize_averages_pairs_only():
    x = np.zeros((2, 52), dtype=np.float32)
    left, right = SYMMETRIC_PAIRS[0]
    x[:, left], x[:, right] = 0.2, 0.6
    x[:, JAW] = 0.7  # unpaired
    out = pp.symmetrize(x)
    assert out[0, left] == pytest.approx(0.4) and out[0, right] == pytest.approx(0.4)
    assert out[0, JAW] == pytest.approx(0.7)
    assert len(SYMMETRIC_PAIRS) == 20


# -- blinks ------------------------------------------------------------------------


def _blink_starts(col):
    """Frames where a blink pattern begins (values > 0 after zeros)."""
    on = col > 0
    return [i for i in range(len(col)) if on[i] and (i == 0 or not on[i - 1])]


def test_clip_blinks_start_at_zero_and_keep_spacing():
    rng = np.random.default_rng(3)
    x = frames(1000, 0.5)
    out = pp.clip_blinks(x, rng)
    left, right = out[:, 8], out[:, 9]
    assert np.array_equal(left, right)
    # pattern 3 starts with 0.0, so find blinks by their 7-frame windows instead
    starts = [0]
    while True:
        nxt = starts[-1] + 7
        rest = np.flatnonzero(left[nxt:] > 0)
        if rest.size == 0:
            break
        s = nxt + rest[0]
        # a pattern beginning with 0 starts one frame before its first non-zero
        starts.append(s)
    gaps = np.diff(starts)
    assert all(60 + 7 - 1 <= g <= 7 + 119 for g in gaps)
    # every blink is a scaled pattern
    seg = left[:7]
    ratios = [seg / p for p in BLINK_PATTERNS if np.all(p > 0)]
    assert any(np.allclose(r, r[0], atol=1e-6) and 0.8 <= r[0] <= 1.0 for r in ratios) or seg[0] == 0
    # other channels untouched
    assert np.array_equal(out[:, :8], x[:, :8])


def test_clip_blinks_zero_channels_when_too_short():
    x = frames(7, 0.5)
    out = pp.clip_blinks(x, np.random.default_rng(0))
    assert np.all(out[:, 8:10] == 0)


def test_clip_blinks_reproducible_with_seed():
    x = frames(500)
    a = pp.clip_blinks(x, np.random.default_rng(42))
    b = pp.clip_blinks(x, np.random.default_rng(42))
    assert np.array_equal(a, b)


def test_stream_blinks_leave_previous_frames_and_short_chunks_alone():
    rng = np.random.default_rng(0)
    x = frames(64 + 7, 0.1)
    out = pp.stream_blinks(x, 64, rng)  # 7 new frames: not more than a blink
    assert np.array_equal(out, x)


def test_stream_blink_first_blink_spacing():
    # last blink (>0.5) in the previous frames at index 60 of 64: 3 frames since
    x = frames(64 + 30, 0.0)
    x[60, 8] = 0.9
    for seed in range(50):
        out = pp.stream_blinks(x, 64, np.random.default_rng(seed))
        new = out[64:, 8]
        assert np.array_equal(out[:64], x[:64])
        # first gap is at least 40 frames from the last blink: 36 into the new
        # frames, beyond this 30-frame chunk -> no blink can land
        assert np.all(new == 0)


def test_stream_blink_when_no_recent_blink_and_at_most_two():
    x = frames(64 + 64, 0.0)
    counts = []
    for seed in range(40):
        out = pp.stream_blinks(x, 64, np.random.default_rng(seed))
        col = out[64:, 8]
        assert np.all(out[:64] == 0)
        # with no blink in 64 previous frames, the first gap (40..99) - 64 -> starts within 35 frames
        nz = np.flatnonzero(col > 0.3)
        assert nz.size > 0 and nz[0] <= 35 + 2
        counts.append(sum(1 for i in range(1, len(col)) if col[i] > 0.5 and col[i - 1] <= 0.5))
    assert max(counts) <= 2


# -- brows -------------------------------------------------------------------------


def test_brow_movement_only_on_loud_runs():
    n = 150
    x = frames(n, 0.0)
    vol = np.zeros(n)
    out = pp.brow_movement(x, vol, np.random.default_rng(0))
    assert np.array_equal(out, x)  # nothing loud -> nothing added
    vol[40:48] = 0.2  # 8 loud frames: short run, whole curve centred on it
    out = pp.brow_movement(x, vol, np.random.default_rng(0))
    touched = np.flatnonzero(out[:, BROW_INNER] > 0)
    assert touched.size in (10, 25)  # one of the two curves, whole
    assert np.all(out[:, 5:] == 0)  # only the five brow channels
    assert out.max() <= 1.0


def test_brow_movement_holds_peak_through_long_run():
    n = 150
    x = frames(n, 0.0)
    vol = np.zeros(n)
    vol[20:120] = 0.1
    vol[50] = 0.5  # loudest frame
    out = pp.brow_movement(x, vol, np.random.default_rng(5))
    col = out[:, BROW_INNER]
    # the hold lasts to the end of the run: a constant stretch of positive values
    assert col[100] > 0 and col[100] == pytest.approx(col[110])
    assert col[125] == 0


def test_pipelines_shapes_and_reproducibility():
    rng = np.random.default_rng(0)
    raw = rng.random((90, 52)).astype(np.float32)
    vol = np.abs(rng.standard_normal(90)) * 0.05
    a = pp.postprocess_clip(raw, vol, np.random.default_rng(1), movement_smooth=True, brow=True)
    b = pp.postprocess_clip(raw, vol, np.random.default_rng(1), movement_smooth=True, brow=True)
    assert a.shape == raw.shape and np.array_equal(a, b)
    prev = a[-64:]
    new = pp.postprocess_chunk(prev, vol[-64:], raw[:30], vol[:30], np.random.default_rng(2))
    assert new.shape == (30, 52)
    first = pp.postprocess_chunk(None, None, raw[:3], vol[:3], np.random.default_rng(2))
    assert first.shape == (3, 52)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 94, 1000])
def test_savgol_is_scipys_filter_exactly_at_every_length(n):
    x = (np.random.default_rng(n).random((n, 52)) * 1.2 - 0.1).astype(np.float32)
    want = np.clip(savgol_filter(x.astype(np.float64), 5, 2, axis=0, mode="mirror"), 0, 1).astype(np.float32)
    assert np.array_equal(pp.savgol_smooth(x), want)
    batch = np.stack([x, x[::-1], x * 0.5])  # a batch: each row as alone
    assert np.array_equal(pp.savgol_smooth(batch)[0], want)
    for got, row in zip(pp.savgol_smooth(batch), batch):
        assert np.array_equal(got, pp.savgol_smooth(row))


def _damp_by_loops(frames, volume, processed_frames):
    """The damping written plainly, row by row (what the vectorised version must equal)."""
    from a2e.constants import MOUTH_GROUP
    from a2e.postprocess import find_silent_runs

    out = np.array(frames, copy=True)
    n = len(out)
    for run in find_silent_runs(volume):
        run = run[run < n]
        if run.size == 0:
            continue
        for r in run:
            out[r, MOUTH_GROUP] *= 0.1
        start, end = int(run[0]), int(run[-1])
        k = min(3, start - processed_frames)
        before = out[start - 1].copy() if k > 0 else None
        for i in range(max(k, 0)):
            w = (i + 1) / (k + 1)
            out[start + i] = before * (1 - w) + out[start + i] * w
        k = min(3, n - end - 1)
        after = out[end + 1].copy() if k > 0 else None
        for i in range(max(k, 0)):
            w = (i + 1) / (k + 1)
            out[end - i] = after * (1 - w) + out[end - i] * w
    return out


def test_vectorised_damping_equals_the_row_by_row_form_bit_for_bit():
    from a2e.postprocess import damp_silent_mouth

    rng = np.random.default_rng(3)
    for _ in range(300):
        t = int(rng.integers(2, 130))
        frames = rng.random((t, 52)).astype(np.float32)
        volume = np.where(rng.random(t) < rng.random(), 0.0, 0.1).astype(np.float32)
        p = int(rng.integers(0, t))
        assert np.array_equal(damp_silent_mouth(frames, volume, p), _damp_by_loops(frames, volume, p))


def test_rms_volume_equals_the_padded_sliding_window_form_bit_for_bit():
    from a2e.audio import rms_volume

    rng = np.random.default_rng(4)
    for n in (1, 100, 532, 533, 534, 16000, 12345, 16000 * 70):
        x = (rng.standard_normal(n) * 0.2).astype(np.float32)
        for frame_length in (533, min(533, n)):
            pad = frame_length // 2
            padded = np.pad(x, (pad, pad + frame_length))
            count = len(rms_volume(x, 16000, frame_length))
            windows = np.lib.stride_tricks.sliding_window_view(padded, frame_length)[::533][:count]
            want = np.sqrt(np.mean(np.square(windows, dtype=np.float32), axis=1, dtype=np.float32))
            assert np.array_equal(rms_volume(x, 16000, frame_length), want)


@pytest.mark.parametrize("silent_from", [None, 40, 58, 62])
def test_a_chunk_after_only_the_stored_frames_history_parts_keeps_is_the_same_bit_for_bit(silent_from):
    rng = np.random.default_rng(7)
    previous = rng.random((64, 52)).astype(np.float32)
    previous[50:56, list(pp._EYES)] = 0.9  # a blink the next chunk's blinks must see
    volume = (0.01 + rng.random(94) * 0.05).astype(np.float32)
    if silent_from is not None:
        volume[silent_from : silent_from + 12] = 0.0  # a silent run into or across the chunk's start
    new = rng.random((30, 52)).astype(np.float32)
    rebuilt = pp.history_from_parts(*pp.history_parts(previous))
    assert rebuilt.shape == previous.shape and not np.array_equal(rebuilt, previous)  # most of it is gone
    for seed in range(5):
        whole = pp.postprocess_chunk(previous, volume[:64], new, volume[64:], np.random.default_rng(seed))
        cut = pp.postprocess_chunk(rebuilt, volume[:64], new, volume[64:], np.random.default_rng(seed))
        assert whole.tobytes() == cut.tobytes()
    short = previous[:3]  # fewer stored frames than a chunk reads back: all are kept
    assert np.array_equal(pp.history_from_parts(*pp.history_parts(short)), short)
