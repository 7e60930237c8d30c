#!/usr/bin/env bash
# One command for a CUDA machine: GPU tests, CUDA graph capture, the model
# throughput table and the real-time session sweep (batching on and off).
#   bash benchmarks/gpu_check.sh            # from the repository root
# Results land in benchmarks/out/*.json (and on stdout); copy the figures to
# benchmarks/RESULTS.md with the machine, date and commit.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
export PYTHONUNBUFFERED=1
echo "== GPU tests"
python -m pytest -q -m cuda tests/
echo "== model throughput (windows/s)"
python benchmarks/model_throughput.py --device cuda --batch-sizes 1 8 32 64 128 256 \
    --modes eager graphs compile --dtypes fp32 bf16 --seconds 3
echo "== real-time sessions, 1 s chunks (fp32, CUDA graphs)"
python benchmarks/realtime_sessions.py --max-batch 256 1 --chunks 8 \
    --sessions 50 100 250 500 1000 1500 2000 2500 3000 \
    --server-args "--device cuda --max-queue 8192 --max-sessions 5000 --io-workers 8"
echo "== serving cost outside the model"
python benchmarks/serving_overhead.py
