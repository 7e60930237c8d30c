"""a2e-lite on real speech: the shared clips, against the released LAM model's
output where we have it, plus its CPU cost.

    python -m training.evaluate_lite [--weights pretrained_models/a2e-lite.safetensors]

Streams each clip in 1 s chunks through the same path the server uses
(``continuous`` context, default post-processing) and reports: correlation of
mouth opening (jawOpen, and jawOpen + mouthLowerDown) with LAM's output on
the English clip (../shared/reference), motion while speaking against in
pauses, frame-to-frame jitter, and CPU time per window at batch 1 and 8.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from a2e import audio as audio_io
from a2e import streaming
from a2e.backend import TorchBackend
from a2e.constants import channel_index
from a2e.lite import DEFAULT_WEIGHTS, load_lite

ROOT = Path(__file__).resolve().parent.parent
CLIPS = sorted((ROOT / "tests" / "data").glob("*_*.wav"))
REFERENCE = ROOT.parent / "shared" / "reference" / "BarackObama_english.lam_output.json"
JAW, LOWER = channel_index("jawOpen"), channel_index("mouthLowerDownLeft")


def stream(backend, x: np.ndarray, identity: int = 0) -> np.ndarray:
    state = streaming.StreamState(identity=identity, rng=np.random.default_rng(0))
    return np.concatenate([streaming.push_chunk(state, backend, x[i : i + 16000]) for i in range(0, len(x), 16000)])


def cost_ms(model, batch: int, threads: int = 2) -> float:
    torch.set_num_threads(threads)
    x = torch.randn(batch, 34133) * 0.1
    ident = torch.nn.functional.one_hot(torch.zeros(batch, dtype=torch.long), 12).float()
    with torch.inference_mode():
        for _ in range(5):
            model(x, ident)
        n, t0 = 0, time.process_time()
        while time.process_time() - t0 < 2.0:
            model(x, ident)
            n += 1
    return (time.process_time() - t0) / n / batch * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    args = p.parse_args()
    model = load_lite(args.weights)
    backend = TorchBackend(model)
    report: dict = {"clips": {}}
    for path in CLIPS:
        if path.stem.startswith("bilabials"):
            continue
        x = audio_io.load(path.read_bytes())
        out = stream(backend, x)
        vol = audio_io.rms_volume(x)[: len(out)]
        speaking = vol > 0.02
        pause = vol < 0.005
        opening = out[:, JAW] + out[:, LOWER]
        row = {
            "seconds": len(x) / 16000,
            "jawOpen_speaking": float(out[speaking, JAW].mean()) if speaking.any() else None,
            "jawOpen_pauses": float(out[pause, JAW].mean()) if pause.any() else None,
            "jitter_jawOpen": float(np.abs(np.diff(out[:, JAW])).mean()),
            "jitter_2nd_diff": float(np.abs(np.diff(opening, 2)).mean()),
        }
        if path.stem == "BarackObama_english" and REFERENCE.exists():
            lam = np.array(json.loads(REFERENCE.read_text())["frames"])
            n = min(len(lam), len(out))
            row["corr_jawOpen_vs_LAM"] = float(np.corrcoef(out[:n, JAW], lam[:n, JAW])[0, 1])
            row["corr_opening_vs_LAM"] = float(np.corrcoef(opening[:n], lam[:n, JAW] + lam[:n, LOWER])[0, 1])
            row["jitter_jawOpen_LAM"] = float(np.abs(np.diff(lam[:, JAW])).mean())
        report["clips"][path.stem] = row
        print(path.stem, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    report["cpu_ms_per_window"] = {f"batch_{b}": cost_ms(model, b) for b in (1, 8)}
    print("CPU ms per window:", {k: round(v, 2) for k, v in report["cpu_ms_per_window"].items()})
    out = ROOT / "training" / "out" / "real_clips.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
