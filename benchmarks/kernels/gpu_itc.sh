#!/usr/bin/env bash
# The prepared GPU command for the fused ITC loss and the hard-negative sampler (issue 4): the GPU tests
# at full size (odd-shape fp32 first: unverified on a GPU since the shared-memory fix; then CUDA-graph
# replay and torch.compile through the registered ops), the ITC timing against the torch reference in
# the same run (B = 64 with a split sweep, then B = 512), and the sampler timing. Each part has its own
# time limit (sum 150 s), most important first. Everything lands in $OUT (kernels.csv + logs).
#   run: bash benchmarks/kernels/gpu_itc.sh        (<= ~150 s on an H100/H200, mostly Triton compiles)
set -uo pipefail
source benchmarks/gpu_env.sh
device_info device_itc.txt
T=tests/gpu/test_itc_kernel_gpu.py
gpu_tests 85 itc_gpu_tests.log "$T::test_odd_shape_fp32" \
    "$T::test_full_size_bf16_queue" "$T::test_cuda_graph_replay_matches_eager" \
    "$T::test_torch_compile_fullgraph_matches_eager" "$T::test_deterministic_and_free_of_host_syncs" \
    "$T::test_sampler_never_the_positive_and_degenerate_rows" "$T::test_sampler_distribution_matches_multinomial" \
    "$T::test_full_size_fp32"
# B=64, bf16 queues: the kernel (default split count, then forced ones) against the eager reference
timeout 30 python3 benchmarks/kernels/bench_itc_loss.py --batch 64 --queue-dtype bf16 --providers triton torch \
    --splits 33 66 132 --csv "$OUT/kernels.csv" 2>&1 | tee "$OUT/bench_itc_b64.log"
timeout 15 python3 benchmarks/kernels/bench_hard_negatives.py --batch 64 512 --providers triton torch albef_loop \
    --csv "$OUT/kernels.csv" 2>&1 | tee "$OUT/bench_hard_negatives.log"
timeout 20 python3 benchmarks/kernels/bench_itc_loss.py --batch 512 --queue-dtype bf16 --providers triton torch \
    --csv "$OUT/kernels.csv" 2>&1 | tee "$OUT/bench_itc_b512.log"
