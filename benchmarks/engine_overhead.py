"""An engine process's own CPU per streaming chunk, outside the model.

    python benchmarks/engine_overhead.py [--sessions 256] [--rounds 20] [--max-batch 64] [--chunk-seconds 1] [--pin]

Starts one engine process with the stub model (constant frames, no compute:
every CPU second the engine spends is serving work: receiving the chunk,
windowing, volume, batching, post-processing, answering), opens
``--sessions`` sessions on it from this process through the same transport
the HTTP workers use, and keeps every session's next chunk in flight so the
batches fill. The engine's CPU time (from /proc) over the run, divided by the
chunks answered, is the figure; the mean batch size comes from the engine.

This is the engine side of issue 10's target (at most 150 µs per chunk at
batch 32 or more); HTTP workers are measured by ``process_split.py``.
Writes benchmarks/out/engine_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, save  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each of the process's threads, by thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue  # the thread ended
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def speech(seconds: float, seed: int) -> np.ndarray:
    """Voiced bursts with pauses, so both the silent-mouth damping and blinks have work."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    env = (np.sin(2 * np.pi * (1.1 + 0.01 * seed) * t) > -0.3).astype(np.float32)
    return ((0.25 * np.sin(2 * np.pi * (150 + seed % 50) * t) + 0.03 * rng.standard_normal(len(t))) * env).astype(
        np.float32
    )


async def drive(pool, sessions: int, rounds: int, chunk_seconds: float, engine_pid: int) -> dict:
    ids = [(await pool.open_session(0, i, "continuous")).session_id for i in range(sessions)]
    audio = [speech(chunk_seconds * (rounds + 2), i) for i in range(sessions)]
    n = int(16000 * chunk_seconds)

    async def one(i: int, first: int, last: int) -> int:
        done = 0
        for r in range(first, last):
            await pool.stream_chunk(ids[i], audio[i][r * n : (r + 1) * n])
            done += 1
        return done

    await asyncio.gather(*(one(i, 0, 2) for i in range(sessions)))  # warm-up: fill every session's context
    before = await pool.links[0].call("stats", {})
    threads0, cpu0, t0 = thread_cpu_seconds(engine_pid), cpu_seconds(engine_pid), time.perf_counter()
    done = sum(await asyncio.gather(*(one(i, 2, rounds + 2) for i in range(sessions))))
    threads1, cpu1, t1 = thread_cpu_seconds(engine_pid), cpu_seconds(engine_pid), time.perf_counter()
    # The event loop's thread (id = pid) against the others (the batcher's).
    loop_s = threads1.get(engine_pid, 0.0) - threads0.get(engine_pid, 0.0)
    after = await pool.links[0].call("stats", {})
    b0, b1 = before[0]["stats"], after[0]["stats"]
    # (Engines before this benchmark existed do not report batch counts.)
    batches = b1.get("batches", 0) - b0.get("batches", 0)
    windows = b1.get("windows", 0) - b0.get("windows", 0)
    for sid in ids:
        await pool.close_session(sid)
    return {
        "chunks": done,
        "engine_cpu_us_per_chunk": round((cpu1 - cpu0) / done * 1e6, 1),
        "event_loop_cpu_us_per_chunk": round(loop_s / done * 1e6, 1),
        "chunks_per_s": round(done / (t1 - t0), 1),
        "mean_batch": round(windows / batches, 1) if batches else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--chunk-seconds", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3, help="measure this many times; all are reported")
    ap.add_argument("--pin", action="store_true", help="engine on the last CPU, this driver on the others (steadier figures)")
    args = ap.parse_args()

    from engine.client import EnginePool
    from engine.supervisor import EngineSupervisor
    from runtime.settings import Settings

    settings = replace(
        Settings(),
        model="stub",
        devices="cpu",
        workers="1",
        max_batch=args.max_batch,
        max_queue=max(4096, 4 * args.sessions),
        max_sessions=args.sessions + 10,
        max_sessions_per_client=args.sessions + 10,
        log_level="warning",
    ).validate()
    supervisor = EngineSupervisor(settings)
    supervisor.start()
    pid = supervisor.procs[0].pid
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        for task in Path(f"/proc/{pid}/task").iterdir():  # every thread of the engine
            os.sched_setaffinity(int(task.name), {cpus[-1]})
        os.sched_setaffinity(0, set(cpus[:-1]) or {cpus[-1]})

    async def run() -> list[dict]:
        pool = EnginePool(settings, supervisor.paths)
        await pool.connect()
        try:
            return [await drive(pool, args.sessions, args.rounds, args.chunk_seconds, pid) for _ in range(args.repeat)]
        finally:
            await pool.disconnect()

    try:
        runs = asyncio.run(run())
    finally:
        supervisor.stop()
    for r in runs:
        print(
            f"{r['chunks']} chunks of {args.chunk_seconds:g} s from {args.sessions} sessions: engine CPU "
            f"{r['engine_cpu_us_per_chunk']:.0f} µs per chunk ({r['event_loop_cpu_us_per_chunk']:.0f} on the event loop's "
            f"thread), mean batch {r['mean_batch']}, {r['chunks_per_s']:.0f} chunks/s"
        )
    save("engine_overhead", {"machine": machine(), "args": vars(args), "runs": runs})


if __name__ == "__main__":
    main()
