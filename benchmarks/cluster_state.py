"""What the shared session store costs, in one run on this machine:

1. Per chunk (``--sessions`` paced REST sessions of 1 s chunks behind
   HAProxy, numbered with chunk_index as a2e_client sends them): serving CPU
   (nodes and redis-server, from /proc) per chunk, latency, and state bytes
   and operations per chunk, for the memory store (one node; two nodes,
   each session on one), the Redis store on one node, the Redis store with
   HAProxy hashing on the session (X-Session-Id) over two nodes (numbered
   chunks and, as the API document's clients send them, unnumbered), and
   round robin over the same two nodes. Each Redis row is set against the
   memory store on as many nodes, in the same repeat.
2. Real-time capacity: the largest number of paced a2e-lite sessions that
   all keep real time, one node with the memory store against three nodes,
   HAProxy and Redis on the same cores (this shows the cost, not the scale).

    python benchmarks/cluster_state.py                      # both parts
    python benchmarks/cluster_state.py --part cost --sessions 20 --seconds 20
    python benchmarks/cluster_state.py --part capacity --levels 40 60 80 100 120
    python benchmarks/cluster_state.py --part cost --model lam --sessions 3 --seconds 10

Needs redis-server and haproxy (Debian's packages). Writes
benchmarks/out/cluster_state[_<part>][_lam][_<N>sessions].json.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_s, machine, released_checkpoint, run_level, save, speech_chunks, tree  # noqa: E402
from tests.cluster_parts import HAProxy, Node, RedisServer  # noqa: E402 - the same real parts the tests start

NODE_ARGS = ["--grpc-port", "0", "--max-sessions-per-client", "1000000", "--max-sessions", "100000"]


def node_args(model: str) -> list[str]:
    """A node's flags: a2e-lite, or LAM-A2E with random weights of the released layout."""
    if model == "lam":
        return [*NODE_ARGS, "--model", "lam", "--weight", str(released_checkpoint())]
    return [*NODE_ARGS, "--model", model]


def _series_sum(text: str, name: str, label: str = "") -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and label in line and not line.startswith("#"))  # fmt: skip


def _store_bytes(nodes: list[Node]) -> dict[str, tuple[float, float]]:
    """Per store operation: bytes moved and operations, summed over the nodes so far."""
    text = "\n".join(requests.get(n.url + "/metrics", timeout=5).text for n in nodes)
    return {op: (_series_sum(text, "a2e_state_store_bytes_sum", f'op="{op}"'),
                 _series_sum(text, "a2e_state_store_seconds_count", f'op="{op}"'))
            for op in ("fetch", "commit")}  # fmt: skip


def cost_run(label: str, nodes: list[Node], urls: list[str], redis: RedisServer | None, n: int, seconds: int,
             numbered: bool) -> dict:  # fmt: skip
    pids = [p for node in nodes for p in tree(node.proc.pid)] + ([redis.proc.pid] if redis else [])
    chunks = speech_chunks(16, 1.0)
    asyncio.run(run_level(urls, min(n, 4), 2, chunks, 1.0, numbered))  # warm every node's paths
    before = _store_bytes(nodes) if redis else None
    cpu0 = cpu_s(pids)
    row = asyncio.run(run_level(urls, n, seconds, chunks, 1.0, numbered))
    cpu = cpu_s(pids) - cpu0
    row.update(config=label, chunks=n * seconds, serving_cpu_ms_per_chunk=round(1000 * cpu / (n * seconds), 3))
    if redis is not None:
        after = _store_bytes(nodes)
        row["state_bytes_per_chunk"] = {op: round((after[op][0] - before[op][0]) / (n * seconds)) for op in after}
        row["state_ops_per_chunk"] = {op: round((after[op][1] - before[op][1]) / (n * seconds), 3) for op in after}
    print(f"{label:>34}: {row['serving_cpu_ms_per_chunk']:.2f} ms CPU/chunk  p50={row['p50']:.3f} p99={row['p99']:.3f} "
          f"kept={row['kept_real_time']}/{n} errors={row['errors']} bytes/chunk={row.get('state_bytes_per_chunk')} "
          f"ops/chunk={row.get('state_ops_per_chunk')}", flush=True)  # fmt: skip
    return row


# (label, store, nodes, balance, numbered chunks, the memory row it is set
# against). A Redis row is compared with the memory store on as many nodes:
# splitting the sessions over two nodes costs CPU of itself (each engine's
# batches are half as full), with any store. The memory store's sessions
# live on the node that opened them, so its two-node row sends each session
# wholly to one node (what hashing on the session gives a store that never
# moves one). Every configuration counts the CPU of its nodes and of
# redis-server; its nodes are health-checked by HAProxy as in every row.
COST_CONFIGS = [
    ("memory, one node", "memory", 1, "roundrobin", True, None),
    ("redis, one node", "redis", 1, "roundrobin", True, "memory, one node"),
    ("memory, 2 nodes, a session on one", "memory", 2, None, True, None),
    ("redis, 2 nodes, session hash", "redis", 2, "session", True, "memory, 2 nodes, a session on one"),
    ("redis, 2 nodes, session hash, unnumbered", "redis", 2, "session", False, "memory, 2 nodes, a session on one"),
    ("redis, 2 nodes, round robin", "redis", 2, "roundrobin", True, "memory, 2 nodes, a session on one"),
]


def part_cost(args, work: Path) -> list[dict]:
    redis = RedisServer(work, fsync="everysec").start()  # as deploy/ runs it
    rows = []
    try:
        nodes_of = {"memory": [Node(node_args(args.model)) for _ in range(2)],
                    "redis": [Node([*node_args(args.model), "--state", redis.url]) for _ in range(2)]}  # fmt: skip
        every = nodes_of["memory"] + nodes_of["redis"]
        for node in every:
            node.start(wait=False)
        for node in every:
            node.wait_healthy()
        for repeat in range(args.repeats):  # alternating, so drift in the machine hits all alike
            for label, store, count, balance, numbered, _ in COST_CONFIGS:
                nodes = nodes_of[store][:count]
                if balance is None:  # one proxy per node, each session to one of them
                    proxies = [HAProxy(work, [node.port]).start() for node in nodes]
                else:
                    proxies = [HAProxy(work, [node.port for node in nodes], balance).start()]
                time.sleep(1.5)  # health checks up
                urls = [proxy.url for proxy in proxies]
                row = cost_run(label, nodes, urls, redis if store == "redis" else None, args.sessions, args.seconds,
                               numbered)  # fmt: skip
                for proxy in proxies:
                    proxy.stop()
                row["repeat"] = repeat
                rows.append(row)
        for node in every:
            node.stop()
    finally:
        redis.stop()
    # Each row against its memory row of the same repeat: the machine's drift
    # from one repeat to the next (this box's memory rows alone spread by
    # 10-20 %) then cancels out of the ratio.
    cpu = {(r["config"], r["repeat"]): r["serving_cpu_ms_per_chunk"] for r in rows}
    against = {label: base or label for label, *_, base in COST_CONFIGS}
    for r in rows:
        r["compared_with"] = against[r["config"]]
        r["cpu_ratio_to_memory"] = round(r["serving_cpu_ms_per_chunk"] / cpu[(against[r["config"]], r["repeat"])], 3)
        one_node = cpu[("memory, one node", r["repeat"])]
        r["cpu_ratio_to_one_memory_node"] = round(r["serving_cpu_ms_per_chunk"] / one_node, 3)
    print("CPU per chunk against the memory store on as many nodes, same repeat (median of repeats):")
    for label, *_ in COST_CONFIGS:
        ratios = sorted(r["cpu_ratio_to_memory"] for r in rows if r["config"] == label)
        to_one = sorted(r["cpu_ratio_to_one_memory_node"] for r in rows if r["config"] == label)
        print(f"{label:>42}: {ratios[len(ratios) // 2]:.3f}  (all: {ratios}; against one memory node: "
              f"{to_one[len(to_one) // 2]:.3f})")  # fmt: skip
    return rows


def capacity(url: str, label: str, levels: list[int], n_chunks: int) -> dict:
    chunks = speech_chunks(16, 1.0)
    best, rows = 0, []
    for n in levels:
        row = asyncio.run(run_level(url, n, n_chunks, chunks, 1.0))
        row["config"] = label
        rows.append(row)
        print(f"{label:>26} N={n:4d} kept={row['kept_real_time']:4d} p50={row['p50']:.3f} p99={row['p99']:.3f} errors={row['errors']}", flush=True)
        if row["kept_real_time"] < n or row["errors"]:
            break
        best = n
    return {"config": label, "max_real_time_sessions": best, "levels": rows}


def part_capacity(args, work: Path) -> list[dict]:
    out = []
    one = Node(node_args(args.model)).start()
    proxy = HAProxy(work, [one.port]).start()
    time.sleep(1.5)
    out.append(capacity(proxy.url, "one node, memory store", args.levels, args.chunks))
    proxy.stop()
    one.stop()
    redis = RedisServer(work).start()
    try:
        nodes = [Node([*node_args(args.model), "--state", redis.url]) for _ in range(3)]
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            node.wait_healthy()
        proxy = HAProxy(work, [n.port for n in nodes]).start()
        time.sleep(1.5)
        out.append(capacity(proxy.url, "3 nodes, redis, round robin", args.levels, args.chunks))
        proxy.stop()
        for node in nodes:
            node.stop()
    finally:
        redis.stop()
    ratio = out[1]["max_real_time_sessions"] / max(1, out[0]["max_real_time_sessions"])
    print(f"three nodes hold {ratio:.2f}x the real-time sessions of one node (target: at least 0.80)")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["cost", "capacity", "both"], default="both")
    p.add_argument("--model", choices=["a2e-lite", "lam"], default="a2e-lite",
                   help="lam: LAM-A2E with random weights of the released layout (what the store costs beside the real model)")
    p.add_argument("--sessions", type=int, default=20, help="paced sessions in the cost part")
    p.add_argument("--seconds", type=int, default=20, help="chunks per session in the cost part")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--levels", type=int, nargs="+", default=[20, 40, 60, 80, 100, 120, 140, 160])
    p.add_argument("--chunks", type=int, default=10, help="chunks per session in the capacity part")
    args = p.parse_args()
    result = {"machine": machine(), "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "model": args.model}
    with tempfile.TemporaryDirectory() as work:
        if args.part in ("cost", "both"):
            result["cost"] = part_cost(args, Path(work))
        if args.part in ("capacity", "both"):
            result["capacity"] = part_capacity(args, Path(work))
    name = "_".join(["cluster_state", *([args.part] if args.part != "both" else []),
                     *([args.model] if args.model != "a2e-lite" else []),
                     *([f"{args.sessions}sessions"] if args.part == "cost" else [])])  # fmt: skip
    print("wrote", save(name, result))


if __name__ == "__main__":
    main()
