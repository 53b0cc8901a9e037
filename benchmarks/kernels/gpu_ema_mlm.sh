#!/usr/bin/env bash
# GPU checks of the EMA and masked-MLM kernels (issue 4, part B), one call on a lent GPU, ~3 minutes:
# the GPU-marked tests at full ALBEF-base size, then both kernel benchmarks. Everything lands in $OUT
# (kernels.csv, logs). Each step has its own time limit, and the benchmarks append their CSV rows after
# every provider, so a slow torch.compile (run last) costs only its own rows.
#   run: bash benchmarks/kernels/gpu_ema_mlm.sh
set -uo pipefail
source benchmarks/gpu_env.sh
device_info device_ema_mlm.txt
timeout 70 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_ema_mlm_kernels_gpu.py 2>&1 \
    | tee "$OUT/gpu_tests_ema_mlm.log"
timeout 40 python3 benchmarks/kernels/bench_ema.py --csv "$OUT/kernels.csv" \
    --providers triton torch reference_loop torch_flat torch_compile 2>&1 | tee "$OUT/bench_ema.log"
timeout 70 python3 benchmarks/kernels/bench_mlm_loss.py --csv "$OUT/kernels.csv" \
    --providers triton chunked torch all_token torch_compile 2>&1 | tee "$OUT/bench_mlm_loss.log"
