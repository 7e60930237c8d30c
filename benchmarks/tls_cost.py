"""What TLS costs the server, in one run on this machine (issue 32's targets).

    python benchmarks/tls_cost.py [--sessions 60] [--streams 60] [--seconds 20] [--key ec|rsa] [--repeats 2]

Starts two servers with the same flags (a2e-lite), one plain and one with
``--tls-cert``/``--tls-key`` (a self-signed certificate made here with
Debian's ``openssl``: P-256 ECDSA, or RSA 2048 with ``--key rsa``), and
loads both at the same time, each with its own clients, so that the
machine's drift from one minute to the next hits both alike and cancels
out of their ratio. Reported, as server CPU (each server's process tree,
from /proc) per chunk, and latency:

1. REST: paced sessions of 1 s WAV chunks on keep-alive connections;
2. gRPC: Audio2Face-3D streams of 100 ms packets (per second of audio);
3. no keep-alive: the same REST sessions, with a new connection (so a full
   handshake, no session resumption) for every request. The extra server
   CPU per request against plain HTTP on new connections is the
   handshake's cost.

Writes benchmarks/out/tls_cost[_rsa].json.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_s, free_port, machine, released_checkpoint, run_level, save  # noqa: E402
from benchmarks.common import speech_chunks, start_server, tree  # noqa: E402
from benchmarks.grpc_streams import grpc_level  # noqa: E402

KEYS = {"ec": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"], "rsa": ["-newkey", "rsa:2048"]}


def self_signed(directory: Path, key: str) -> tuple[Path, Path]:
    cert, private = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", *KEYS[key], "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(private), "-out", str(cert)],
                   check=True, capture_output=True)  # fmt: skip
    return cert, private


class Side:
    """One server and what its clients need to reach it."""

    def __init__(self, label: str, extra: list[str], tls: ssl.SSLContext | None, grpc_creds) -> None:
        self.label, self.tls, self.grpc_creds = label, tls, grpc_creds
        self.grpc_port = free_port()
        self.proc, self.url = start_server(released_checkpoint(), 32, [
            "--model", "a2e-lite", "--grpc-port", str(self.grpc_port), "--stream-hop-s", "0.5", *extra], tls)

    def cpu(self) -> float:
        return cpu_s(tree(self.proc.pid))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def together(sides: list[Side], load, units: float) -> list[dict]:
    """``load(side)`` (a coroutine) on every side at once; each side's server
    CPU per unit of work (``units``: chunks or seconds of audio per side)."""
    async def run() -> list[dict]:
        return await asyncio.gather(*(load(side) for side in sides))

    start = [side.cpu() for side in sides]
    rows = asyncio.run(run())
    for side, row, cpu0 in zip(sides, rows, start):
        row.update(side=side.label, server_cpu_ms_per_unit=round(1000 * (side.cpu() - cpu0) / units, 3))
    return rows


def report(part: str, rows: list[dict], unit: str) -> dict:
    plain, tls = rows
    ratio = tls["server_cpu_ms_per_unit"] / plain["server_cpu_ms_per_unit"]
    for row in rows:
        print(f"{part:>14} {row['side']:>5}: {row['server_cpu_ms_per_unit']:7.3f} ms server CPU per {unit}  "
              f"p50={row['p50']:.4f} p99={row['p99']:.4f} kept={row['kept_real_time']}/{row['sessions']} "
              f"errors={row['errors']}", flush=True)  # fmt: skip
    print(f"{part:>14} TLS / plain = {ratio:.3f}  (+{tls['server_cpu_ms_per_unit'] - plain['server_cpu_ms_per_unit']:.3f} ms "
          f"per {unit}; p50 +{1000 * (tls['p50'] - plain['p50']):.2f} ms)", flush=True)  # fmt: skip
    return {"part": part, "unit": unit, "plain": plain, "tls": tls, "tls_over_plain": round(ratio, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=60, help="paced REST sessions per server")
    ap.add_argument("--streams", type=int, default=60, help="gRPC streams per server")
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--key", choices=sorted(KEYS), default="ec")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--parts", nargs="+", default=["rest", "grpc", "fresh"], choices=["rest", "grpc", "fresh"])
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tls_cost_"))
    cert, key = self_signed(work, args.key)
    client = ssl.create_default_context(cafile=str(cert))
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    sides = [Side("plain", [], None, None), Side("tls", ["--tls-cert", str(cert), "--tls-key", str(key)], client, creds)]
    chunks = speech_chunks(16, 1.0)
    speech = np.concatenate([np.frombuffer(c[44:], dtype="<i2") for c in speech_chunks(args.seconds + 1)])
    pcm = speech[: args.seconds * 16000]
    n, s = args.sessions, args.seconds

    def rest(fresh: bool):
        return lambda side: run_level(side.url, n, s, chunks, 1.0, True, side.tls, fresh)

    def streams(side: Side):
        target = f"127.0.0.1:{side.grpc_port}"
        return grpc_level(target, args.streams, pcm, 1600, 0.5, -(-len(pcm) * 30 // 16000), side.grpc_creds)

    results = []
    try:
        for side in sides:  # warm every path on both
            asyncio.run(run_level(side.url, 4, 2, chunks, 1.0, True, side.tls))
            asyncio.run(run_level(side.url, 4, 2, chunks, 1.0, True, side.tls, True))
        for repeat in range(args.repeats):
            if "rest" in args.parts:
                results.append(report("REST keep-alive", together(sides, rest(False), n * s), "chunk"))
            if "grpc" in args.parts:
                results.append(report("gRPC streams", together(sides, streams, args.streams * s), "audio s"))
            if "fresh" in args.parts:
                results.append(report("REST new conn", together(sides, rest(True), n * s), "chunk"))
    finally:
        for side in sides:
            side.stop()
    fresh = [r for r in results if r["part"] == "REST new conn"]
    kept = [r for r in results if r["part"] == "REST keep-alive"]
    summary = {}
    if fresh:
        # Every chunk request of a session opens a connection, and so do init and close.
        per_request = n * s / (n * (s + 2))
        summary["handshake_cpu_ms_per_request"] = [
            round(per_request * (r["tls"]["server_cpu_ms_per_unit"] - r["plain"]["server_cpu_ms_per_unit"]), 3) for r in fresh]
        summary["handshake_p50_ms"] = [round(1000 * (r["tls"]["p50"] - r["plain"]["p50"]), 2) for r in fresh]
    if kept:
        summary["rest_keep_alive_ratio"] = [r["tls_over_plain"] for r in kept]
    summary["grpc_ratio"] = [r["tls_over_plain"] for r in results if r["part"] == "gRPC streams"]
    print(summary, flush=True)
    name = "tls_cost" + ("" if args.key == "ec" else f"_{args.key}")
    save(name, {"machine": machine(), "args": vars(args), "openssl": ssl.OPENSSL_VERSION, "rows": results,
                "summary": summary, "finished": time.strftime("%H:%M:%S")})  # fmt: skip


if __name__ == "__main__":
    main()
