"""Model throughput: streaming windows per second against batch size, for each
execution mode (eager, CUDA graphs, torch.compile) and precision, on one device.

    python benchmarks/model_throughput.py --device cpu --batch-sizes 1 2 4 8 --dtypes fp32 bf16
    python benchmarks/model_throughput.py --device cuda --batch-sizes 1 8 32 128 256 --modes eager graphs compile

Uses a random-weight model of the released layout (same cost as the real one).
Prints a table and writes benchmarks/out/model_throughput.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from a2e.checkpoint import load_model  # noqa: E402
from a2e.constants import WINDOW_SAMPLES  # noqa: E402
from a2e.model import ModelDims  # noqa: E402
from batching.runner import ModelRunner  # noqa: E402
from benchmarks.common import machine, released_checkpoint, save  # noqa: E402


def measure(runner: ModelRunner, batch: int, seconds: float, min_iters: int = 3) -> float:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((batch, WINDOW_SAMPLES)) * 0.1).astype(np.float32)
    ids = np.arange(batch) % runner.num_identities
    runner.run_windows(w, ids)  # warm-up
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < seconds:
        runner.run_windows(w, ids)
        n += 1
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    return batch * n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--modes", nargs="+", default=["eager", "graphs"], choices=["eager", "graphs", "compile"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = released_checkpoint()
    rows = []
    print(f"{'mode':8} {'dtype':5} " + " ".join(f"{'B=' + str(b):>9}" for b in args.batch_sizes) + "   (windows/s)")
    for mode in args.modes:
        if mode == "graphs" and not args.device.startswith("cuda"):
            continue  # CUDA graphs need CUDA
        for dtype in args.dtypes:
            model = load_model(ckpt, ModelDims.released())
            runner = ModelRunner(
                model,
                args.device,
                dtype=dtype,
                max_batch=max(args.batch_sizes),
                cuda_graphs=mode in ("graphs", "compile"),
                compile=mode == "compile",
            )
            rates = [measure(runner, b, args.seconds) for b in args.batch_sizes]
            rows.append({"mode": runner.mode, "dtype": dtype, "rates": dict(zip(args.batch_sizes, rates))})
            print(f"{mode:8} {dtype:5} " + " ".join(f"{r:9.1f}" for r in rates), flush=True)
            del runner, model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    path = save("model_throughput", {"machine": machine(), "device": args.device, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
