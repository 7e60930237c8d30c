"""Per-session tuning (a2e.tuning): parsing, and what each parameter does to
which channels, without a server."""

from __future__ import annotations

import numpy as np
import pytest

from a2e import tuning
from a2e.constants import ARKIT_NAMES, channel_index

rng = np.random.default_rng(3)
FRAMES = rng.uniform(0.0, 0.8, size=(40, 52)).astype(np.float32)
JAW, CLOSE, BLINK_L, BLINK_R = (channel_index(n) for n in ("jawOpen", "mouthClose", "eyeBlinkLeft", "eyeBlinkRight"))
BROW = channel_index("browInnerUp")


def tuned(spec, frames=FRAMES):
    parsed = tuning.parse(spec)
    assert parsed.tuning is not None
    return tuning.apply(frames, parsed.tuning, None)[0]


def changed_channels(a, b):
    return {ARKIT_NAMES[i] for i in np.flatnonzero(~np.isclose(a, b, atol=0, rtol=0).all(axis=0))}


@pytest.mark.parametrize(
    "spec",
    [None, {}, {"face_params": {"lowerFaceStrength": 1.0, "upperFaceSmoothing": 0.0}}, {"multipliers": {"JawOpen": 1}, "clamp": False}],
)
def test_neutral_specs_change_nothing(spec):
    assert tuning.parse(spec).tuning is None


def test_a2f_names_are_arkit_capitalised_in_our_order():
    assert len(tuning.A2F_NAMES) == 52
    assert tuning.A2F_NAMES[channel_index("jawOpen")] == "JawOpen"
    assert tuning.A2F_NAMES[channel_index("mouthRollLower")] == "MouthRollLower"
    assert [n.lower() for n in tuning.A2F_NAMES] == [n.lower() for n in ARKIT_NAMES]


def test_multipliers_and_offsets_by_either_name_touch_only_their_channel():
    out = tuned({"multipliers": {"JawOpen": 1.5}, "offsets": {"eyeBlinkLeft": 0.25}})
    assert changed_channels(out, FRAMES) == {"jawOpen", "eyeBlinkLeft"}
    assert np.allclose(out[:, JAW], FRAMES[:, JAW] * 1.5)
    assert np.allclose(out[:, BLINK_L], FRAMES[:, BLINK_L] + 0.25)


def test_face_strengths_split_upper_lower_and_blinks():
    lower = changed_channels(tuned({"face_params": {"lowerFaceStrength": 1.5}}), FRAMES)
    upper = changed_channels(tuned({"face_params": {"upperFaceStrength": 0.5}}), FRAMES)
    blink = changed_channels(tuned({"face_params": {"blinkStrength": 0.5}}), FRAMES)
    assert {"jawOpen", "mouthFunnel", "mouthClose", "cheekPuff", "tongueOut"} <= lower
    assert {"browInnerUp", "eyeLookUpLeft", "eyeSquintRight", "noseSneerLeft"} <= upper
    assert blink == {"eyeBlinkLeft", "eyeBlinkRight"}
    assert not lower & upper and not (lower | upper) & blink
    assert len(lower | upper | blink) == 52


def test_offsets_of_the_face():
    out = tuned({"face_params": {"lipOpenOffset": 0.1, "eyelidOpenOffset": 0.2, "blinkOffset": 0.05}})
    assert changed_channels(out, FRAMES) == {"mouthClose", "eyeBlinkLeft", "eyeBlinkRight"}
    assert np.allclose(out[:, CLOSE], FRAMES[:, CLOSE] - 0.1)  # lips part: less mouthClose
    assert np.allclose(out[:, BLINK_R], FRAMES[:, BLINK_R] - 0.15)  # eyes open by 0.2, blink offset 0.05


def test_face_parameters_come_before_multipliers_and_offsets():
    spec = {"face_params": {"lowerFaceStrength": 2.0, "lipOpenOffset": -0.1}, "multipliers": {"MouthClose": 0.5}, "offsets": {"MouthClose": 0.01}}
    out = tuned(spec)
    assert np.allclose(out[:, CLOSE], (FRAMES[:, CLOSE] * 2.0 + 0.1) * 0.5 + 0.01)


def test_clamping():
    out = tuned({"multipliers": {"JawOpen": 3.0}, "offsets": {"BrowInnerUp": -0.5}, "clamp": True})
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out[:, JAW].max() == 1.0 and out[:, BROW].min() == 0.0
    unclamped = tuned({"multipliers": {"JawOpen": 3.0}})
    assert unclamped[:, JAW].max() > 1.0


def test_smoothing_is_a_low_pass_carried_across_chunks():
    spec = {"face_params": {"lowerFaceSmoothing": 0.05}}
    t = tuning.parse(spec).tuning
    whole, _ = tuning.apply(FRAMES, t, None)
    a, last = tuning.apply(FRAMES[:13], t, None)
    b, _ = tuning.apply(FRAMES[13:], t, last)
    assert np.array_equal(np.concatenate([a, b]), whole)  # chunking never shows
    assert changed_channels(whole, FRAMES) <= {n for n in ARKIT_NAMES if n.startswith(("jaw", "mouth", "cheekPuff", "tongue"))}
    # A low-pass: less frame-to-frame movement, same first frame.
    assert np.abs(np.diff(whole[:, JAW])).sum() < 0.5 * np.abs(np.diff(FRAMES[:, JAW])).sum()
    assert whole[0, JAW] == FRAMES[0, JAW]
    # One pole with time constant tau at 30 fps.
    a_ = tuning.smoothing_coefficient(0.05)
    assert a_ == pytest.approx(1 - np.exp(-1 / 1.5))
    assert whole[1, JAW] == pytest.approx(FRAMES[0, JAW] + a_ * (FRAMES[1, JAW] - FRAMES[0, JAW]), rel=1e-6)


def test_what_cannot_be_honoured_is_reported_not_refused():
    parsed = tuning.parse(
        {"face_params": {"skinStrength": 1.1, "tongueStrength": 1.3, "frobnicate": 2.0, "lowerFaceStrength": 1.2},
         "multipliers": {"TongueTipUp": 0.5, "TongueIn": 1.0}}
    )  # fmt: skip
    assert parsed.tuning is not None
    assert "face_params.skinStrength" in parsed.ignored and "face_params.tongueStrength" in parsed.ignored
    assert "face_params.frobnicate (unknown)" in parsed.ignored
    assert any(i.startswith("multipliers.TongueTipUp") for i in parsed.ignored)
    assert not any("TongueIn" in i for i in parsed.ignored)  # neutral: nothing was asked of it


@pytest.mark.parametrize(
    "spec,words",
    [
        ({"multipliers": {"jawOpenn": 1.2}}, "unknown blend shape"),
        ({"multipliers": {"JawOpen": "big"}}, "must be a number"),
        ({"multipliers": {"JawOpen": float("nan")}}, "finite"),
        ({"offsets": {"JawOpen": 1e6}}, "between"),
        ({"face_params": {"lowerFaceStrength": 2.5}}, "between 0 and 2"),
        ({"face_params": {"lipOpenOffset": -0.5}}, "between -0.2 and 0.2"),
        ({"clamp": "yes"}, "true or false"),
        ({"multiplier": {}}, "unknown fields"),
        ([1, 2], "must be an object"),
        ({"face_params": [1]}, "name -> number"),
    ],
)
def test_mistakes_are_refused_with_the_reason(spec, words):
    with pytest.raises(tuning.TuningError, match=words):
        tuning.parse(spec)


def test_what_is_ignored_is_reported_within_bounds():
    parsed = tuning.parse({"face_params": {f"knob{'x' * 500}{i}": 1.0 for i in range(1000)}})
    assert parsed.tuning is None and len(parsed.ignored) == tuning.MAX_REPORTED + 1
    assert parsed.ignored[-1] == f"... and {1000 - tuning.MAX_REPORTED} more"
    assert max(len(i) for i in parsed.ignored) < 100
