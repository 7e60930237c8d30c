"""``lam-a2e``: animate or stream audio files against a LAM-A2E server.

    lam-a2e animate clip.wav -o out.json [--format json|json_named|csv|gltf|ndjson]
    lam-a2e stream clip.wav -o out.ndjson [--chunk-s 1] [--websocket]
    lam-a2e health

``--url`` (or ``LAM_A2E_URL``) says where the server is (``https://`` too),
``--api-key`` (or ``LAM_A2E_API_KEY``) its key; ``--ca-cert`` verifies a
server whose certificate a private CA signed, ``--client-cert`` and
``--client-key`` answer mutual TLS. Progress goes to stderr; results to
``-o`` or stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import requests

from .client import Client, ServerError, pcm_chunks

EXTENSIONS = {".json": "json", ".csv": "csv", ".glb": "gltf", ".ndjson": "ndjson", ".jsonl": "ndjson"}


def _bar(done: float, total: float, label: str) -> None:
    if not sys.stderr.isatty() and done < total:
        return  # no bar in logs: only the final line
    width = 30
    filled = int(width * min(1.0, done / total)) if total else width
    sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done:.1f}/{total:.1f} s")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _write(data: bytes, out: str | None) -> None:
    if out in (None, "-"):
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        Path(out).write_bytes(data)


def _duration(path: str) -> float:
    import soundfile as sf

    info = sf.info(path)
    return info.frames / info.samplerate


def animate(client: Client, args: argparse.Namespace) -> None:
    fmt = args.format or EXTENSIONS.get(Path(args.output or "").suffix, "json")
    sys.stderr.write(f"animating {args.audio} ({_duration(args.audio):.1f} s) as {fmt}...\n")
    t0 = time.perf_counter()
    result = client.animate(args.audio, id_idx=args.id_idx, movement_smooth=args.movement_smooth,
                            brow_movement=args.brow_movement, ex_vol=args.ex_vol, seed=args.seed, format=fmt)  # fmt: skip
    data = json.dumps(result, ensure_ascii=False).encode() if isinstance(result, dict) else result
    _write(data, args.output)
    sys.stderr.write(f"done in {time.perf_counter() - t0:.2f} s: {len(data)} bytes to {args.output or 'stdout'}\n")


def stream(client: Client, args: argparse.Namespace) -> None:
    total = _duration(args.audio)
    chunks = pcm_chunks(args.audio, args.chunk_s)
    options = {"seed": args.seed}
    if args.websocket:
        frames = client.stream_websocket(chunks, id_idx=args.id_idx, **options)
    else:
        frames = client.stream(chunks, id_idx=args.id_idx, progress=lambda k, s: _bar(s, total, "streaming"), **options)
    out = sys.stdout if args.output in (None, "-") else open(args.output, "w", encoding="utf-8")
    try:
        n = 0
        for frame in frames:  # NDJSON: one frame per line, as it arrives
            out.write(json.dumps({"frame": n, "time": round(frame["time"], 6), "weights": frame["weights"]}) + "\n")
            n += 1
            if args.websocket:
                _bar(min(total, frame["time"]), total, "streaming")
        if args.websocket:
            _bar(total, total, "streaming")  # REST's last chunk has drawn the full bar already
        sys.stderr.write(f"{n} frames\n")
    finally:
        if out is not sys.stdout:
            out.close()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["cluster", "up"]:  # the operator's command: its own flags, imported only here
        from local_cluster.up import main as cluster_up

        return cluster_up(argv[2:])
    ap = argparse.ArgumentParser(prog="lam-a2e", description="Animate speech with a LAM-A2E server.")
    ap.add_argument("--url", default=os.environ.get("LAM_A2E_URL", "http://localhost:8000"))
    ap.add_argument("--api-key", default=os.environ.get("LAM_A2E_API_KEY"))
    ap.add_argument("--ca-cert", default=os.environ.get("LAM_A2E_CA_CERT"), help="PEM CA to verify an https:// server by")
    ap.add_argument("--client-cert", default=os.environ.get("LAM_A2E_CLIENT_CERT"), help="PEM client certificate (mutual TLS)")
    ap.add_argument("--client-key", default=os.environ.get("LAM_A2E_CLIENT_KEY"), help="PEM key of --client-cert")
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("animate", "stream"):
        p = sub.add_parser(name, help="a whole file (/api/infer)" if name == "animate" else "a file chunk by chunk")
        p.add_argument("audio")
        p.add_argument("-o", "--output", help="file to write (default stdout)")
        p.add_argument("--id-idx", type=int, default=0)
        p.add_argument("--seed", type=int)
        if name == "animate":
            p.add_argument("--format", choices=["json", "json_named", "csv", "gltf", "ndjson"],
                           help="default: from the output's extension (.json .csv .glb .ndjson), else json")  # fmt: skip
            p.add_argument("--movement-smooth", action="store_true")
            p.add_argument("--brow-movement", action="store_true")
            p.add_argument("--ex-vol", action="store_true")
        else:
            p.add_argument("--chunk-s", type=float, default=1.0, help="seconds per chunk (REST)")
            p.add_argument("--websocket", action="store_true", help="one WebSocket connection instead of REST chunks")
    sub.add_parser("health", help="the server's /api/health")
    args = ap.parse_args(argv)
    if (args.client_cert is None) != (args.client_key is None):
        ap.error("--client-cert and --client-key go together")
    client = Client(args.url, api_key=args.api_key, ca_cert=args.ca_cert, client_cert=args.client_cert, client_key=args.client_key)
    try:
        if args.command == "health":
            print(json.dumps(client.health(), indent=2))
        elif args.command == "animate":
            animate(client, args)
        else:
            stream(client, args)
    except ServerError as exc:
        print(f"error: the server answered {exc.status}: {exc.detail}", file=sys.stderr)
        return 1
    except requests.exceptions.SSLError as exc:
        print(f"error: TLS with {args.url} failed ({exc}); --ca-cert names a private CA, --client-cert/--client-key answer mutual TLS",
              file=sys.stderr)  # fmt: skip
        return 1
    except (OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
