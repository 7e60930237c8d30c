"""What the shared session store costs, in one run on this machine:

1. Per chunk (``--sessions`` paced REST sessions of 1 s chunks behind
   HAProxy, numbered with chunk_index as a2e_client sends them): serving CPU
   (nodes and redis-server, from /proc) per chunk, latency, and state bytes
   and operations per chunk, for the memory store (one node; two nodes,
   each session on one), the Redis store on one node, the Redis store with
   HAProxy hashing on the session (X-Session-Id) over two nodes (numbered
   chunks and, as the API document's clients send them, unnumbered), and
   round robin over the same two nodes. Each Redis configuration runs at
   the same time as the memory store on as many nodes, each with its own
   sessions, so that the machine's drift cancels out of their ratio.
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
from local_cluster.nodes import HAProxy, Node  # noqa: E402 - the parts `lam-a2e cluster up` starts
from local_cluster.redis_parts import RedisServer  # noqa: E402

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


def _measure(nodes: list[Node], redis: RedisServer | None) -> dict[str, list[int]]:
    """The processes whose CPU a configuration is charged: its nodes, and redis-server apart."""
    return {"nodes": [p for node in nodes for p in tree(node.proc.pid)], "redis": [redis.proc.pid] if redis else []}


def cost_pair(sides: list[tuple[str, list[Node], list[str], RedisServer | None, bool]], n: int, seconds: int) -> list[dict]:
    """Each side's ``n`` paced sessions at the same time (a side: label,
    nodes, URLs, its redis-server or None, numbered chunks), and what each
    side's processes spent per chunk over the same seconds."""
    chunks = speech_chunks(16, 1.0)

    async def together(chunks_each: int, sessions: int) -> list[dict]:
        return await asyncio.gather(*(run_level(urls, sessions, chunks_each, chunks, 1.0, numbered)
                                      for _, _, urls, _, numbered in sides))  # fmt: skip

    asyncio.run(together(2, min(n, 4)))  # warm every node's paths
    pids = [_measure(nodes, redis) for _, nodes, _, redis, _ in sides]
    before = [_store_bytes(nodes) if redis else None for _, nodes, _, redis, _ in sides]
    cpu0 = [{part: cpu_s(p) for part, p in side.items()} for side in pids]
    rows = asyncio.run(together(seconds, n))
    out = []
    for (label, nodes, _, redis, _), row, side, start, was in zip(sides, rows, pids, cpu0, before):
        per_chunk = {part: 1000 * (cpu_s(p) - start[part]) / (n * seconds) for part, p in side.items()}
        row.update(config=label, chunks=n * seconds, serving_cpu_ms_per_chunk=round(sum(per_chunk.values()), 3),
                   node_cpu_ms_per_chunk=round(per_chunk["nodes"], 3))  # fmt: skip
        if redis is not None:
            after = _store_bytes(nodes)
            row["redis_server_cpu_ms_per_chunk"] = round(per_chunk["redis"], 3)
            row["state_bytes_per_chunk"] = {op: round((after[op][0] - was[op][0]) / (n * seconds)) for op in after}
            row["state_ops_per_chunk"] = {op: round((after[op][1] - was[op][1]) / (n * seconds), 3) for op in after}
        print(f"{label:>42}: {row['serving_cpu_ms_per_chunk']:.2f} ms CPU/chunk (redis-server "
              f"{row.get('redis_server_cpu_ms_per_chunk', 0):.2f})  p50={row['p50']:.3f} p99={row['p99']:.3f} "
              f"kept={row['kept_real_time']}/{n} errors={row['errors']} bytes/chunk={row.get('state_bytes_per_chunk')} "
              f"ops/chunk={row.get('state_ops_per_chunk')}", flush=True)  # fmt: skip
        out.append(row)
    return out


# A configuration: (label, store, nodes, balance, numbered chunks); balance
# None: one proxy per node, each session wholly on one of them (what the
# memory store needs, its sessions living where they were opened, and what
# hashing on the session gives a store that never moves one). Each pair runs
# at the same time, on the same cores, each side with its own sessions and
# processes: whatever the machine does meanwhile (this box's CPU cost per
# chunk drifts by 10-20 % from one minute to the next) hits both sides alike
# and cancels out of their ratio, which run one after the other it did not
# (ratios then spread over 30 %). A Redis configuration is set against the
# memory store on as many nodes: splitting sessions over two nodes costs CPU
# with any store (each engine's batches are half as full), shown apart.
MEMORY_ONE = ("memory, one node", "memory", 1, "roundrobin", True)
MEMORY_TWO = ("memory, 2 nodes, a session on one", "memory", 2, None, True)
COST_PAIRS = [
    (("redis, one node", "redis", 1, "roundrobin", True), MEMORY_ONE),
    (("redis, 2 nodes, session hash", "redis", 2, "session", True), MEMORY_TWO),
    (("redis, 2 nodes, session hash, unnumbered", "redis", 2, "session", False), MEMORY_TWO),
    (("redis, 2 nodes, round robin", "redis", 2, "roundrobin", True), MEMORY_TWO),
    (MEMORY_TWO, MEMORY_ONE),
]


def part_cost(args, work: Path) -> list[dict]:
    redis = RedisServer(work, fsync="everysec").start()  # as deploy/ runs it
    rows = []
    try:
        # Two sets of memory nodes: the last pair sets one against the other.
        nodes_of = {"memory": [Node(node_args(args.model)) for _ in range(3)],
                    "redis": [Node([*node_args(args.model), "--state", redis.url]) for _ in range(2)]}  # fmt: skip
        every = nodes_of["memory"] + nodes_of["redis"]
        for node in every:
            node.start(wait=False)
        for node in every:
            node.wait_healthy()
        for repeat in range(args.repeats):
            for pair in COST_PAIRS:
                free = {"memory": list(nodes_of["memory"]), "redis": list(nodes_of["redis"])}
                sides, proxies = [], []
                numbered = pair[0][4]  # the baseline sends the same requests as the store it is set against
                for label, store, count, balance, _ in pair:
                    nodes = [free[store].pop(0) for _ in range(count)]
                    if balance is None:
                        mine = [HAProxy(work, [node.port]).start() for node in nodes]
                    else:
                        mine = [HAProxy(work, [node.port for node in nodes], balance).start()]
                    proxies += mine
                    sides.append((label, nodes, [proxy.url for proxy in mine], redis if store == "redis" else None,
                                  numbered))  # fmt: skip
                time.sleep(1.5)  # health checks up
                redis_row, base_row = cost_pair(sides, args.sessions, args.seconds)
                for proxy in proxies:
                    proxy.stop()
                redis_row.update(repeat=repeat, compared_with=base_row["config"],
                                 cpu_ratio_to_memory=round(redis_row["serving_cpu_ms_per_chunk"]
                                                           / base_row["serving_cpu_ms_per_chunk"], 3),
                                 baseline_cpu_ms_per_chunk=base_row["serving_cpu_ms_per_chunk"])  # fmt: skip
                rows.append(redis_row)
        for node in every:
            node.stop()
    finally:
        redis.stop()
    print("CPU per chunk against the memory store, run at the same time (median of repeats):")
    for (label, *_), (base, *_) in COST_PAIRS:
        ratios = sorted(r["cpu_ratio_to_memory"] for r in rows if r["config"] == label)
        print(f"{label:>42} / {base}: {ratios[len(ratios) // 2]:.3f}  (all: {ratios})")
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
