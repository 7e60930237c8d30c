"""Peak memory of a real server for worst-case uploads within the documented
limits: one at a time, and 20 at once.

    python benchmarks/hostile_memory.py [--tree DIR] [--concurrent 20]

Starts ``app.py`` from ``--tree`` (default: this checkout; point it at a
``git worktree`` of an older commit to compare in one run) with its default
settings, resets the process's peak-RSS mark (``/proc/PID/clear_refs``) before
each case and reads ``VmHWM`` after it. Uploads are silence, which compresses
to almost nothing: the shape of a decompression bomb.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import ROOT, machine, save  # noqa: E402


def silent(fmt: str, sr: int, channels: int, seconds: int, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", sr, channels, format=fmt, subtype=subtype) as f:
        block = np.zeros((sr, channels), dtype=np.float32)
        for _ in range(seconds):
            f.write(block)
    return buf.getvalue()


CASES = {
    # the bombs: refused from their headers now
    "flac_8ch_655kHz_590s": lambda: silent("FLAC", 655350, 8, 590),
    "ogg_8ch_192kHz_590s": lambda: silent("OGG", 192000, 8, 590, "VORBIS"),
    # the largest work the limits still admit: decoded, block by block
    "flac_2ch_96kHz_590s": lambda: silent("FLAC", 96000, 2, 590),
    "wav16_1ch_16kHz_590s": lambda: silent("WAV", 16000, 1, 590, "PCM_16"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def run_case(url: str, pid: int, data: bytes, concurrent: int) -> dict:
    time.sleep(0.5)
    reset_peak(pid)
    before = status(pid, "VmRSS")

    def post() -> int:
        try:
            return requests.post(url + "/api/infer", files={"audio_file": ("a.flac", data)}, timeout=300).status_code
        except requests.RequestException:
            return -1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrent) as pool:
        codes = list(pool.map(lambda _: post(), range(concurrent)))
    return {
        "upload_mb": round(len(data) / 1e6, 2),
        "concurrent": concurrent,
        "statuses": {str(c): codes.count(c) for c in sorted(set(codes))},
        "seconds": round(time.perf_counter() - t0, 2),
        "rss_before_mib": round(before / 2**20, 1),
        "peak_growth_mib": round((status(pid, "VmHWM") - before) / 2**20, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", default=str(ROOT), help="source tree whose app.py to run")
    ap.add_argument("--concurrent", type=int, default=20)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=args.tree,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if requests.get(url + "/api/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        results = {}
        for name in args.cases.split(","):
            data = CASES[name]()
            for n in (1, args.concurrent):
                results[f"{name} x{n}"] = r = run_case(url, proc.pid, data, n)
                print(f"{name:24s} x{n:<3d} {json.dumps(r)}", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    print(save("hostile_memory", {"machine": machine(), "tree": args.tree, "results": results}))


if __name__ == "__main__":
    main()
