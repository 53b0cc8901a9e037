#!/usr/bin/env bash
# Every prepared GPU check in one device call (the device tool returns at most 8 files, so the
# per-topic outputs are packed into one archive). Per-part time limits keep the call predictable.
#   run: bash benchmarks/gpu_all.sh
set -uo pipefail
FINAL=${OUT:-/tmp/albef_gpu_out}
WORK=$(mktemp -d)
run_part() {  # name, seconds, script
    echo "=== $1 (limit $2 s) ==="
    mkdir -p "$WORK/$1"
    local t0=$SECONDS
    OUT="$WORK/$1" timeout "$2" bash "$3" > "$WORK/$1/console.log" 2>&1
    echo "rc=$? after $((SECONDS - t0)) s"
    tail -n 25 "$WORK/$1/console.log"
}
run_part train_step 90 benchmarks/gpu_run.sh
[ -f benchmarks/kernels/gpu_itc.sh ] && run_part itc 140 benchmarks/kernels/gpu_itc.sh
[ -f benchmarks/kernels/gpu_ema_mlm.sh ] && run_part ema_mlm 100 benchmarks/kernels/gpu_ema_mlm.sh
[ -f benchmarks/gpu_attention.sh ] && run_part attention 120 benchmarks/gpu_attention.sh
[ -f benchmarks/gpu_parity.sh ] && run_part parity 80 benchmarks/gpu_parity.sh
mkdir -p "$FINAL"
tar czf "$FINAL/gpu_results.tgz" -C "$WORK" .
