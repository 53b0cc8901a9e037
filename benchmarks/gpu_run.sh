#!/usr/bin/env bash
# The one prepared command for a lent GPU (device tool): GPU-marked tests, then the train-step
# benchmark at batch 64 in bf16 (and fp32 on the same card for comparison). Everything lands in $OUT.
#   run: bash benchmarks/gpu_run.sh
set -uo pipefail
source benchmarks/gpu_env.sh
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, timm, triton; print('torch', torch.__version__, 'timm', timm.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/device.txt"
python3 -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_step.py 2>&1 | tee "$OUT/gpu_tests.log"
python3 benchmarks/bench_train_step.py --preset albef_tiny albef_base --batch 64 --precision bf16 \
    --warmup 3 --repeat 10 --csv "$OUT/train_step.csv" 2>&1 | tee "$OUT/bench_bf16.log"
python3 benchmarks/bench_train_step.py --preset albef_base --batch 64 --precision fp32 \
    --warmup 2 --repeat 5 --csv "$OUT/train_step.csv" 2>&1 | tee "$OUT/bench_fp32.log"
