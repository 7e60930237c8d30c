"""``lam-a2e cluster up``: a whole cluster on this machine from its own
binaries, until Ctrl-C or SIGTERM.

    lam-a2e cluster up [--nodes 3] [--redis single|sentinel|cluster] [--balance roundrobin|session]
                       [--grpc] [--dir DIR] [--down-after-ms 1000] [-- NODE FLAGS...]

Starts Redis (one server; a primary, a replica and three sentinels; or a
Redis Cluster of three primaries with a replica each), the nodes with
``--state`` pointing at it, and HAProxy in front, all on free loopback
ports; prints where each is (one JSON line on stdout, for scripts, and a
summary on stderr); on Ctrl-C or SIGTERM stops everything it started.
Flags after ``--`` go to every node (``-- --model lam --weight W``).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
from pathlib import Path

from .cluster import REDIS_KINDS, Cluster
from .processes import MissingTool

# Every simulated client comes from 127.0.0.1: lift the per-client session cap.
NODE_DEFAULTS = ["--max-sessions-per-client", "100000"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lam-a2e cluster up", description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--redis", choices=REDIS_KINDS, default="single")
    ap.add_argument("--balance", choices=["roundrobin", "session"], default="roundrobin")
    ap.add_argument("--grpc", action="store_true", help="each node's Audio2Face-3D gRPC port, behind HAProxy too")
    ap.add_argument("--dir", type=Path, help="working directory (Redis files, node logs); default a new temporary one")
    ap.add_argument("--down-after-ms", type=int, default=1000, help="with --redis sentinel: Sentinel's down-after-milliseconds")
    ap.add_argument("--fsync", choices=["always", "everysec", "no"], default="everysec", help="Redis appendfsync")
    return ap


def describe(cluster: Cluster, workdir: Path) -> dict:
    return {
        "url": cluster.url,
        "grpc": cluster.proxy.grpc_target if cluster.proxy.grpc_port else None,
        "state": cluster.redis.url,
        "nodes": [n.url for n in cluster.nodes],
        "dir": str(workdir),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    node_flags: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, node_flags = argv[:at], argv[at + 1 :]
    args = parser().parse_args(argv)
    if args.nodes < 1:
        parser().error("--nodes must be at least 1")
    if args.redis == "cluster":
        # The Redis Cluster itself starts (RedisCluster in redis_parts), but the
        # nodes refuse a redis+cluster:// store until the keys share a slot.
        parser().error("--redis cluster: the nodes do not support a Redis Cluster store yet; use single or sentinel")
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="lam-a2e-cluster-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        flags = [*NODE_DEFAULTS, *([] if args.grpc else ["--grpc-port", "0"]), *node_flags]
        cluster = Cluster(workdir, [flags for _ in range(args.nodes)], args.balance,
                          grpc=args.grpc, redis=args.redis, fsync=args.fsync, down_after_ms=args.down_after_ms,
                          logs=True)  # fmt: skip
    except MissingTool as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        cluster.start()
        where = describe(cluster, workdir)
        print(json.dumps(where), flush=True)
        print(f"cluster up: {where['url']} ({args.nodes} nodes, HAProxy {args.balance}; Redis {args.redis}: "
              f"--state {where['state']}){'; gRPC ' + where['grpc'] if where['grpc'] else ''}\n"
              f"logs in {workdir}; Ctrl-C stops it all", file=sys.stderr, flush=True)  # fmt: skip
        stop.wait()
    except (AssertionError, OSError) as exc:
        print(f"error: the cluster did not start: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
        print("cluster down", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
