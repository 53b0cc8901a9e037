#!/usr/bin/env bash
# Attention on a lent GPU (issue 5), one command, under ~3 minutes; everything lands in $OUT:
#   device.txt               card, driver, versions, which attention kernels this torch has
#   attention_gpu_tests.log  tests/gpu/test_attention_gpu.py (flash vs PyTorch in bf16, autocast policy)
#   attention.csv / bench_attention.log   ViT and fusion-stack fwd+bwd time, peak memory and saved
#                            activations per backend (math, sdpa, torch_flash[, flash_attn]), with and
#                            without the image key/value reuse: albef_base, B=64, bf16, 256 px
#   run: bash benchmarks/gpu_attention.sh
set -uo pipefail
source benchmarks/gpu_env.sh
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "
import torch, timm, triton
import albef_fast.models.attention as a
print('torch', torch.__version__, 'timm', timm.__version__, 'triton', triton.__version__)
print('flash-attn installed:', a.flash_attn_available(), '| torch.nn.attention.varlen:', a.torch_varlen_available())
"
} 2>&1 | tee "$OUT/device.txt"
timeout 100 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_attention_gpu.py 2>&1 | tee "$OUT/attention_gpu_tests.log"
timeout 150 python3 benchmarks/bench_attention.py --preset albef_base --batch 64 --precision bf16 --repeat 4 \
    --csv "$OUT/attention.csv" 2>&1 | tee "$OUT/bench_attention.log"
