"""Bytes a chunk's write puts into the session store, and the CPU its
encoding costs, for this commit's codec against an older commit's, in one run
on the same chunks: real speech (the clips in tests/data) streamed through
a2e-lite in 1 s chunks of 16-bit audio, each chunk's write (state, answer,
audio piece) encoded and decoded by both.

    python benchmarks/store_bytes.py                  # against HEAD~1's codec
    python benchmarks/store_bytes.py --against 456c85c

Writes benchmarks/out/store_bytes.json.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from a2e import streaming  # noqa: E402
from a2e.backend import TorchBackend  # noqa: E402
from a2e.lite import load_lite  # noqa: E402
from a2e.loudness import LoudnessMode  # noqa: E402
from benchmarks.common import machine, save  # noqa: E402
from engine import session_codec  # noqa: E402
from engine.protocol import ChunkResult  # noqa: E402

CLIPS = ["BarackObama_english.wav", "FangXiao_japanese.wav", "LinJing_TTS_chinese.wav"]


def old_codec(commit: str):
    """``engine/session_codec.py`` as it was at ``commit``, as a module."""
    text = subprocess.run(["git", "show", f"{commit}:engine/session_codec.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "old_session_codec.py"
    path.write_text(text.replace("from .protocol import", "from engine.protocol import"))
    spec = importlib.util.spec_from_file_location("old_session_codec", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pcm_chunks(name: str) -> list[np.ndarray]:
    audio, rate = sf.read(ROOT / "tests" / "data" / name, dtype="float32", always_2d=True)
    audio = soxr.resample(audio.mean(axis=1), rate, 16000)
    ints = np.round(np.clip(audio, -1, 1) * 32767).astype(np.int16)  # as 16-bit PCM arrives
    audio = ints.astype(np.float32) / np.float32(32768)
    return [audio[i : i + 16000] for i in range(0, len(audio) - 15999, 16000)]


def measure(codec, writes: list[tuple], repeats: int) -> dict:
    sizes = {"state": [], "answer": [], "audio": []}
    encode_s = decode_s = 0.0
    for state, result, chunk in writes:
        for _ in range(repeats):
            t = time.process_time()
            s, a, p = codec.encode_state(state), codec.encode_answer(result, 1), codec.encode_audio(chunk)
            encode_s += time.process_time() - t
            t = time.process_time()
            codec.decode_state(s, [p]), codec.decode_answer(a)
            decode_s += time.process_time() - t
        sizes["state"].append(len(s)), sizes["answer"].append(len(a)), sizes["audio"].append(len(p))
    n = len(writes) * repeats
    mean = {k: float(np.mean(v)) for k, v in sizes.items()}
    return {"bytes": {**mean, "total": sum(mean.values())}, "encode_ms": 1000 * encode_s / n,
            "decode_ms": 1000 * decode_s / n}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", default="HEAD~1", help="the commit whose codec is the baseline")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    backend = TorchBackend(load_lite())
    old = old_codec(args.against)
    report = {"machine": machine(), "against": args.against, "clips": {}}
    for name in CLIPS:
        state = streaming.StreamState(identity=0, rng=np.random.default_rng(0), loudness_mode=LoudnessMode.OFF)
        writes = []
        for k, chunk in enumerate(pcm_chunks(name)):
            frames = streaming.push_chunk(state, backend, chunk)
            writes.append((copy.deepcopy(state), ChunkResult(frames, k + 1, 1.0, k * 1.0, "continuous"), chunk))
        new_m, old_m = measure(session_codec, writes, args.repeats), measure(old, writes, args.repeats)
        report["clips"][name] = {"chunks": len(writes), "now": new_m, "before": old_m,
                                 "bytes_ratio": new_m["bytes"]["total"] / old_m["bytes"]["total"]}  # fmt: skip
        print(f"{name}: {len(writes)} chunks; bytes per 1 s chunk {old_m['bytes']['total'] / 1024:.1f} KB -> "
              f"{new_m['bytes']['total'] / 1024:.1f} KB (state {new_m['bytes']['state']:.0f}, answer "
              f"{new_m['bytes']['answer']:.0f}, audio {new_m['bytes']['audio']:.0f} B); encode "
              f"{old_m['encode_ms']:.3f} -> {new_m['encode_ms']:.3f} ms, decode {old_m['decode_ms']:.3f} -> "
              f"{new_m['decode_ms']:.3f} ms")  # fmt: skip
    print(save("store_bytes", report))


if __name__ == "__main__":
    main()
