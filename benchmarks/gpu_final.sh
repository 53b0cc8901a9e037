#!/usr/bin/env bash
# Short follow-up device call: the fp32-queue ITC kernel tests after the shared-memory fix, then the
# end-to-end albef_base training step (B=64, bf16) with every fast path on.
set -uo pipefail
source benchmarks/gpu_env.sh
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_itc_kernel_gpu.py -k "fp32" 2>&1 | tail -5 | tee "$OUT/itc_fp32_tests.log"
timeout 110 python3 benchmarks/bench_train_step.py --preset albef_base --batch 64 --precision bf16 \
    --warmup 2 --repeat 5 --csv "$OUT/train_step.csv" 2>&1 | tee "$OUT/bench_bf16.log"
