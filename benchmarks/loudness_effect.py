"""What recording level does to the animation, and what the loudness options undo.

    python benchmarks/loudness_effect.py [--weight CKPT]

For each shared clip, a quiet (x0.1), normal and loud (peak 0.99) copy go
through the whole-clip path (model and mouth damping) with loudness off,
gates and normalize. Reported per copy, against the normal copy in the same
mode: the largest change of any non-blink weight, and the agreement (Jaccard)
of the frames the mouth damping touches. Writes benchmarks/out/loudness_effect.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from a2e import audio, loudness, postprocess  # noqa: E402
from a2e.backend import TorchBackend  # noqa: E402
from a2e.checkpoint import load_model  # noqa: E402
from a2e.model import ModelDims  # noqa: E402
from benchmarks.common import machine, released_checkpoint, save  # noqa: E402

CLIPS = sorted((ROOT / "tests" / "data").glob("*.wav"))
NON_BLINK = [c for c in range(52) if c not in (8, 9)]


def damped_frames(x: np.ndarray, mode: loudness.LoudnessMode) -> set[int]:
    if mode is loudness.LoudnessMode.NORMALIZE:
        x = np.clip(x * loudness.cliploudness.clip_gain(x), -1, 1)
    vol = audio.rms_volume(x)
    if mode is loudness.LoudnessMode.GATES:
        vol = vol * loudness.cliploudness.clip_gain(x)
    return {int(i) for run in postprocess.find_silent_runs(vol) for i in run}


def raw_output(backend, x: np.ndarray, mode: loudness.LoudnessMode) -> np.ndarray:
    if mode is loudness.LoudnessMode.NORMALIZE:
        x = np.clip(x * loudness.cliploudness.clip_gain(x), -1, 1)
    return backend.run_clip(x, 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weight", type=Path)
    args = p.parse_args()
    backend = TorchBackend(load_model(args.weight or released_checkpoint(), ModelDims.released()))
    rows = []
    for path in CLIPS:
        x = audio.load(path.read_bytes())
        copies = {"quiet": x * 0.1, "normal": x, "loud": x * (0.99 / np.abs(x).max())}
        for mode in loudness.LoudnessMode:
            ref_out = raw_output(backend, copies["normal"], mode)
            ref_damp = damped_frames(copies["normal"], mode)
            for name in ("quiet", "loud"):
                out = raw_output(backend, copies[name], mode)
                damp = damped_frames(copies[name], mode)
                jac = len(damp & ref_damp) / len(damp | ref_damp) if damp | ref_damp else 1.0
                row = {
                    "clip": path.stem,
                    "lufs_normal": loudness.integrated_loudness(x),
                    "copy": name,
                    "mode": mode.value,
                    "max_change": float(np.abs(out[:, NON_BLINK] - ref_out[:, NON_BLINK]).max()),
                    "damped_frames": len(damp),
                    "damped_frames_normal": len(ref_damp),
                    "damping_jaccard": jac,
                }
                rows.append(row)
                print(
                    f"{path.stem:24} {name:6} {mode.value:9} max change {row['max_change']:.4f}  "
                    f"damped {len(damp):4d} vs {len(ref_damp):4d} (Jaccard {jac:.2f})",
                    flush=True,
                )
    out = save("loudness_effect", {"machine": machine(), "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
