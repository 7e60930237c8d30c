"""Real-time streaming sessions, measured the way Audio2Face-3D and Riva do:
N paced sessions each send a 1 s chunk every second (``--chunk-seconds``);
a session keeps real time when every answer arrives before its next chunk
is due.

    python benchmarks/realtime_sessions.py --sessions 2 4 6 8 10 12 --max-batch 8 1
    python benchmarks/realtime_sessions.py --sessions 100 200 400 --max-batch 32 1 --server-args "--model a2e-lite"
    python benchmarks/realtime_sessions.py --url http://127.0.0.1:8000 --sessions 100 200

Without ``--url`` it starts the server itself (``app.py``, random weights of
the released layout unless ``--weight``), once per ``--max-batch`` value, so
batching on and off are compared in one run. Per N it reports chunk latency
p50/p90/p99 (from when the chunk was due), first-chunk latency, and how many
sessions kept real time; then the largest N at which all of them did.
Writes benchmarks/out/realtime_sessions.json.

The client is a small asyncio HTTP/1.1 client with pre-built multipart
bodies, so that on a small machine it takes as little CPU as possible from
the server it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import STATUSES, machine, released_checkpoint, run_level, save, speech_chunks, start_server  # noqa: E402

def sweep(url: str, levels: list[int], n_chunks: int, label: str, chunk_s: float = 1.0) -> list[dict]:
    chunks = speech_chunks(16, chunk_s)
    rows = []
    failures = 0
    for n in levels:
        row = asyncio.run(run_level(url, n, n_chunks, chunks, chunk_s))
        row["config"] = label
        rows.append(row)
        print(
            f"{label:>14} N={n:4d} kept={row['kept_real_time']:4d} p50={row['p50']:.3f} p90={row['p90']:.3f} "
            f"p99={row['p99']:.3f} first={row['first_chunk_p50']:.3f}/{row['first_chunk_max']:.3f} errors={row['errors']}",
            flush=True,
        )
        failures = failures + 1 if row["kept_real_time"] < n else 0
        if failures >= 2:
            break
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="measure a running server instead of starting one")
    p.add_argument("--weight", type=Path, help="checkpoint (default: random weights of the released layout)")
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 6, 8, 10, 12, 16])
    p.add_argument("--max-batch", type=int, nargs="+", default=[8, 1], help="one sweep per value (own server)")
    p.add_argument("--chunks", type=int, default=10, help="chunks per session")
    p.add_argument("--chunk-seconds", type=float, default=1.0, help="audio per chunk; one chunk per that much time")
    p.add_argument("--server-args", default="", help="extra flags for app.py, e.g. '--dtype bf16'")
    args = p.parse_args()
    rows = []
    if args.url:
        rows += sweep(args.url, args.sessions, args.chunks, "external", args.chunk_seconds)
    else:
        weight = args.weight or released_checkpoint()
        for mb in args.max_batch:
            proc, url = start_server(weight, mb, args.server_args.split())
            try:
                rows += sweep(url, args.sessions, args.chunks, f"max_batch={mb}", args.chunk_seconds)
            finally:
                proc.terminate()
                proc.wait(30)
    best = {}
    for r in rows:
        if r["kept_real_time"] == r["sessions"] and r["errors"] == 0:
            best[r["config"]] = max(best.get(r["config"], 0), r["sessions"])
    print("largest N with every session in real time:", best)
    if STATUSES:
        print("non-200 answers by status:", STATUSES)
    path = save("realtime_sessions", {"machine": machine(), "server_args": args.server_args, "rows": rows, "best": best})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
