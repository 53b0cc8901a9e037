#!/usr/bin/env bash
# Fast paths (Triton kernels, attention backends) against the plain PyTorch path on the GPU, through
# the parity harness: albef_base, batch 16, fp32 (TF32 off) and bf16 (low-precision rule).
#   run: bash benchmarks/gpu_parity.sh
set -uo pipefail
source benchmarks/gpu_env.sh
python3 -m pytest -q -p no:cacheprovider tests/parity -m gpu -s 2>&1 | tee "$OUT/parity_gpu_tests.log"
for d in float32 bfloat16; do
    timeout 150 python3 -m albef_fast.cli parity --preset albef_base --reference fastpath --device cuda \
        --dtype $d --batch 16 2>&1 | grep -v INFO | tee "$OUT/parity_fastpath_base_$d.log"
done
