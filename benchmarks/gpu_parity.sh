#!/usr/bin/env bash
# Fast paths (Triton kernels, attention backends) against the plain PyTorch path on the GPU, through
# the parity harness: the GPU-marked parity tests (tiny preset, fp32 and bf16), then albef_base in bf16
# (low-precision rule) at batch 8. Limits keep it inside one device call.
#   run: bash benchmarks/gpu_parity.sh
set -uo pipefail
source benchmarks/gpu_env.sh
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/parity -m gpu -s 2>&1 | grep -v INFO > "$OUT/parity_gpu_tests.log"
echo "pytest rc=$?"; tail -n 30 "$OUT/parity_gpu_tests.log"
timeout 100 python3 -m albef_fast.cli parity --preset albef_base --reference fastpath --device cuda \
    --dtype bfloat16 --batch 8 2>&1 | grep -v INFO | tee "$OUT/parity_fastpath_base_bf16.log"
echo "parity rc=${PIPESTATUS[0]}"
