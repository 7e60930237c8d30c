"""Audio2Face-3D gRPC streams (``ProcessAudioStream``) against REST chunks, in one run.

    python benchmarks/a2f_grpc.py --sessions 50 100 200 300 [--packet-ms 100] [--seconds 8]

Starts the server (a2e-lite, ``--server-args`` for more flags) and, per level,
N gRPC streams that each send a header, then ``--packet-ms`` packets of
16 kHz 16-bit speech at real-time pace for ``--seconds``, then end of audio,
as a live Audio2Face-3D client would. Reported per level:

* first animation data: from the first audio sent to the first frames
  received (the issue's target: within one hop, ``--stream-hop-s``);
* answer latency: for every animation data, from when the packet that
  completed its first frame was due to when it arrived (p50, p99);
* kept real time: streams whose every answer came within two hops of its
  audio, whose frame count was exactly 30 per second of audio and which
  ended with SUCCESS;
* server CPU per second of audio (the server's process tree), and the same
  for REST sessions sending 1 s WAV chunks at the same N
  (``realtime_sessions.py``'s client), measured in the same run.

Writes benchmarks/out/a2f_grpc.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_s, machine, released_checkpoint, save, tree  # noqa: E402
from benchmarks.common import free_port, rest_comparison, speech_chunks, start_server  # noqa: E402
from benchmarks.grpc_streams import grpc_level  # noqa: E402

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--packet-ms", type=float, default=100)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--hop", type=float, default=0.5, help="the server's --stream-hop-s")
    ap.add_argument("--no-rest", action="store_true", help="skip the REST comparison")
    ap.add_argument("--server-args", default="--model a2e-lite")
    args = ap.parse_args()

    speech = np.concatenate([np.frombuffer(c[44:], dtype="<i2") for c in speech_chunks(int(args.seconds) + 1)])
    pcm = speech[: int(args.seconds * 16000)]
    want = -(-len(pcm) * 30 // 16000)
    packet = int(args.packet_ms * 16)
    grpc_port = free_port()
    extra = [*args.server_args.split(), "--grpc-port", str(grpc_port), "--stream-hop-s", str(args.hop)]
    proc, url = start_server(released_checkpoint(), 32, extra)
    target = f"127.0.0.1:{grpc_port}"
    rows = []
    try:
        for n in args.sessions:
            cpu0, mine0 = cpu_s(tree(proc.pid)), time.process_time()
            row = asyncio.run(grpc_level(target, n, pcm, packet, args.hop, want))
            cpu, mine = cpu_s(tree(proc.pid)) - cpu0, time.process_time() - mine0
            audio_s = n * len(pcm) / 16000
            row.update(transport="grpc", hop=args.hop, packet_ms=args.packet_ms,
                       server_cpu_ms_per_audio_s=round(1000 * cpu / audio_s, 3),
                       client_cpu_ms_per_audio_s=round(1000 * mine / audio_s, 3))  # fmt: skip
            rows.append(row)
            print(
                f"gRPC hop={args.hop} N={n:4d} kept={row['kept_real_time']:4d} exact={row['exact_frame_counts']:4d} "
                f"first-animation p50={row['first_animation_p50']:.3f} p99={row['first_animation_p99']:.3f} "
                f"answers p50={row['p50']:.3f} p99={row['p99']:.3f} errors={row['errors']} {row['error_kinds'] or ''} "
                f"server CPU {row['server_cpu_ms_per_audio_s']:.2f} ms per audio s (client {row['client_cpu_ms_per_audio_s']:.2f})",
                flush=True,
            )
            if not args.no_rest:
                rows.append(rest_comparison(url, proc.pid, n, args.seconds))
    finally:
        proc.terminate()
        proc.wait(20)
    save("a2f_grpc", {"machine": machine(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
