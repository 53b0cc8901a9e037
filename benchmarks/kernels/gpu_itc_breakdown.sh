#!/usr/bin/env bash
# Where the fused ITC's GPU time goes (issue 4's B = 64 target). First the GPU tests of the eager path
# (full size, bf16 and fp32 queues, the queue-load path not chosen by default, odd shapes, CUDA-graph
# replay, determinism). Then the op against the torch reference (same run), and per stage: the split-K
# kernel with TMA and with pointer loads, the combine kernel at its config and the former one, the
# backward as one Triton kernel and as torch ops, forward, forward + backward; and the host's time per
# eager call with a cProfile. B = 64 and 512, bf16 queues. SWEEP=1 adds every split-K config. The SDPA
# candidate (O and LSE from PyTorch's cuDNN / flash / efficient attention) runs in each part: its GPU
# test, its fwd+bwd beside the kernel's, its attention calls alone.
#   run: bash benchmarks/kernels/gpu_itc_breakdown.sh      (~4-5 min on an H100/H200, mostly compiles)
set -uo pipefail
source benchmarks/gpu_env.sh
device_info device_itc.txt
T=tests/gpu/test_itc_kernel_gpu.py
gpu_tests 130 itc_gpu_tests.log "$T::test_full_size_bf16_queue" \
    "$T::test_cuda_graph_replay_matches_eager" "$T::test_odd_shape_fp32" \
    "$T::test_deterministic_and_free_of_host_syncs" "$T::test_full_size_other_queue_loads" \
    "$T::test_full_size_fp32" "$T::test_inbatch_launch_bf16_queue" "$T::test_full_size_sdpa_path"
timeout 60 python3 benchmarks/kernels/bench_itc_loss.py --batch 64 512 --queue-dtype bf16 \
    --providers triton torch sdpa_cudnn sdpa_flash sdpa_efficient \
    --csv "$OUT/kernels.csv" 2>&1 | tee "$OUT/bench_itc.log"
timeout 90 python3 benchmarks/kernels/bench_itc_loss.py --batch 64 512 --breakdown ${SWEEP:+--sweep} \
    --csv "$OUT/kernels.csv" 2>&1 | tee "$OUT/bench_itc_breakdown.log"
