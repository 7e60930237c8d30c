"""a2e-lite's training pieces that need no speech synthesiser: .pho parsing,
visemes, targets, styles and augmentation."""

import numpy as np
import pytest

from a2e.constants import channel_index
from training import augment, targets
from training.synth import parse_pho
from tests.conftest import DATA

CLOSE, JAW = channel_index("mouthClose"), channel_index("jawOpen")


@pytest.mark.parametrize(
    "symbol,visemes",
    [
        ("p", ["PP"]), ("b", ["PP"]), ("m", ["PP"]), ("p_h", ["PP"]), ("f", ["FF"]), ("T", ["TH"]),
        ("tS", ["CH"]), ("ts.", ["CH"]), ("s", ["SS"]), ("t", ["DD"]), ("k", ["kk"]), ("r", ["RR"]),
        ("A", ["aa"]), ("i:", ["I"]), ("u", ["U"]), ("O", ["O"]), ("@", ["E"]),
        ("aI", ["aa", "I"]), ("@U", ["E", "U"]), ("uai", ["U", "I"]), ("_", ["sil"]), ("_:", ["sil"]),
        ("4", ["DD"]), ("i55", ["I"]), ("s.'i.51", ["CH"]), ("'a", ["aa"]),
    ],
)  # fmt: skip
def test_visemes(symbol, visemes):
    assert targets.visemes_of(symbol) == visemes


def test_parse_pho_and_bilabial_targets():
    phonemes = parse_pho((DATA / "bilabials_us3.pho").read_text())
    assert phonemes[0][0] == "m" and phonemes[0][1] == 0.0
    assert all(b > a for _, a, b in phonemes)
    assert all(abs(p[2] - q[1]) < 1e-9 for p, q in zip(phonemes, phonemes[1:]))  # contiguous
    import soundfile as sf

    audio, _ = sf.read(DATA / "bilabials_us3.wav", dtype="float32")
    y = targets.neutral_targets(phonemes, audio)
    assert y.shape == (int(np.ceil(len(audio) / 16000 * 30)), 52)
    at = {"PP": [], "aa": [], "sil": []}
    for sym, a, b in phonemes:
        vis = targets.visemes_of(sym)[0]
        if vis in at and b - a > 0.05:
            f = int(round(((a + b) / 2 - targets.LEAD_S) * 30))
            if 0 <= f < len(y):
                at[vis].append(y[f])
    assert np.mean([v[CLOSE] for v in at["PP"]]) > 0.15 > np.mean([v[CLOSE] for v in at["aa"]])
    assert np.mean([v[JAW] for v in at["aa"]]) > np.mean([v[JAW] for v in at["PP"]]) + 0.05
    # coarticulated: a plosive release is fast, but no channel jumps its full range in a frame
    assert np.abs(np.diff(y, axis=0)).max() < 0.45


def test_silence_is_neutral():
    y = targets.neutral_targets([("_", 0.0, 1.0)], np.zeros(16000, np.float32))
    assert np.all(y == 0)
    loud_phonemes = [("A", 0.0, 1.0)]
    quiet = targets.neutral_targets(loud_phonemes, np.full(16000, 0.002, np.float32))
    loud = targets.neutral_targets(loud_phonemes, np.full(16000, 0.3, np.float32))
    assert loud[15, JAW] > quiet[15, JAW]  # intensity follows loudness


def test_styles_differ_and_stay_in_range():
    base = np.zeros((30, 52), np.float32)
    base[:, JAW] = 0.2
    base[:, channel_index("mouthPucker")] = 0.1
    styled = np.stack([targets.apply_style(base, i) for i in range(12)])
    assert len(targets.STYLES) == 12
    assert styled.min() >= 0 and styled.max() <= 1
    flat = styled.reshape(12, -1)
    assert all(not np.allclose(flat[i], flat[j]) for i in range(12) for j in range(i + 1, 12))
    assert styled[5, :, channel_index("mouthSmileLeft")].mean() > 0.2  # smiling


@pytest.mark.parametrize("fn", [augment.gain, augment.noise, augment.reverb, augment.telephone, augment.mp3_round_trip, augment.augment])
def test_augmentations_keep_length_and_finiteness(fn):
    rng = np.random.default_rng(0)
    x = (np.sin(np.arange(34133) / 7) * 0.3).astype(np.float32)
    y = fn(x, rng)
    assert y.shape == x.shape and y.dtype == np.float32 and np.isfinite(y).all()
    assert not np.array_equal(x, y)
