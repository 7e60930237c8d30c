#!/usr/bin/env bash
# One command for a CUDA machine: GPU tests, CUDA graph capture, the model
# throughput table, and real-time sessions per GPU through the process model
# (HTTP workers + one engine on cuda:0): fp32 and bf16, 1 s and 0.5 s chunks,
# and the worker count that saturates the device.
#   bash benchmarks/gpu_check.sh            # from the repository root
# Results land in benchmarks/out/*.json (and on stdout); copy the figures to
# benchmarks/RESULTS.md with the machine, date and commit. A session counts
# as kept when every answer arrives before its next chunk is due; read the
# p99 column against the 150 ms target.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
export PYTHONUNBUFFERED=1
SERVER="--devices cuda:0 --max-queue 16384 --max-sessions 20000 --io-workers 4"
LEVELS="250 500 1000 2000 3000 4000"
echo "== GPU tests"
python -m pytest -q -m cuda tests/
echo "== model throughput (windows/s)"
python benchmarks/model_throughput.py --device cuda --batch-sizes 1 8 32 64 128 256 \
    --modes eager graphs compile --dtypes fp32 bf16 --seconds 3
WORKERS=$(( $(nproc) > 9 ? 8 : $(nproc) - 1 ))
for dtype in bf16 fp32; do
  for chunk in 1.0 0.5; do
    echo "== real-time sessions: $dtype, ${chunk} s chunks, $WORKERS workers + 1 engine"
    python benchmarks/realtime_sessions.py --max-batch 256 --chunks 8 --chunk-seconds "$chunk" \
        --sessions $LEVELS --server-args "$SERVER --dtype $dtype --workers $WORKERS"
  done
done
echo "== workers needed to saturate the device (bf16, 1 s chunks)"
for w in 0 1 2 4 $WORKERS; do
  python benchmarks/realtime_sessions.py --max-batch 256 --chunks 6 --sessions $LEVELS \
      --server-args "$SERVER --dtype bf16 --workers $w"
done
echo "== serving cost: processes, transport, stages"
python benchmarks/process_split.py
python benchmarks/serving_overhead.py
