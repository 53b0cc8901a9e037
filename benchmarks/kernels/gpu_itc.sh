#!/usr/bin/env bash
# The prepared GPU command for the fused ITC loss and the hard-negative sampler (issue 4, part A):
# GPU tests at full size, then both benchmarks. Everything lands in $OUT (kernels.csv + logs).
#   run: bash benchmarks/kernels/gpu_itc.sh        (~2-3 minutes on an H100/H200, mostly compiles)
set -uo pipefail
source benchmarks/gpu_env.sh
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/device_itc.txt"
python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_itc_kernel_gpu.py 2>&1 | tee "$OUT/itc_gpu_tests.log"
# B=64: every provider with bf16 queues plus a split-count sweep for tuning; fp32 queues without torch.compile
python3 benchmarks/kernels/bench_itc_loss.py --batch 64 --queue-dtype bf16 --splits 16 33 66 132 264 \
    --csv "$OUT/kernels.csv" 2>&1 | tee "$OUT/bench_itc_b64.log"
python3 benchmarks/kernels/bench_itc_loss.py --batch 64 --queue-dtype fp32 --providers triton torch \
    --csv "$OUT/kernels.csv" 2>&1 | tee -a "$OUT/bench_itc_b64.log"
# B=256/512: the compute-bound end (no torch.compile, to keep the run short)
python3 benchmarks/kernels/bench_itc_loss.py --batch 256 512 --queue-dtype bf16 --providers triton torch \
    --csv "$OUT/kernels.csv" 2>&1 | tee "$OUT/bench_itc_b512.log"
python3 benchmarks/kernels/bench_hard_negatives.py --batch 64 512 --csv "$OUT/kernels.csv" 2>&1 \
    | tee "$OUT/bench_hard_negatives.log"
