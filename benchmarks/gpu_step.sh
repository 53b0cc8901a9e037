#!/usr/bin/env bash
# The train-step benchmark alone: albef_base at batch 64, bf16 autocast, current code (fast paths on).
#   run: bash benchmarks/gpu_step.sh
set -uo pipefail
source benchmarks/gpu_env.sh
python3 benchmarks/bench_train_step.py --preset albef_base --batch 64 --precision bf16 --warmup 3 --repeat 10 \
    --csv "$OUT/train_step.csv" 2>&1 | grep -v -i warn | tee "$OUT/bench_bf16.log"
