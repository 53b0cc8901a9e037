#!/usr/bin/env bash
# Every prepared GPU check in one device call (the device tool returns at most 8 files, so the
# per-topic outputs are packed into one archive). Per-part time limits keep the call predictable.
#   run: bash benchmarks/gpu_all.sh [part ...]   (parts below; gpu_wheels/ must be carried for 'distributed')
# The part limits add up to more than one device call (600 s) and a session's device budget (15 min):
# name the parts for each call, e.g. `itc ema_mlm parity` (450 s) or `dali` (with the DALI wheels).
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
# parts: name limit script; `bash benchmarks/gpu_all.sh [name ...]` runs the named ones (default: all)
PARTS=(
  "train_step 90 benchmarks/gpu_run.sh"
  "itc 160 benchmarks/kernels/gpu_itc.sh"
  "itc_breakdown 300 benchmarks/kernels/gpu_itc_breakdown.sh"
  "ema_mlm 100 benchmarks/kernels/gpu_ema_mlm.sh"
  "attention 120 benchmarks/gpu_attention.sh"
  "parity 190 benchmarks/gpu_parity.sh"
  "step 75 benchmarks/gpu_step.sh"
  "distributed 200 benchmarks/gpu_distributed.sh"
  "dali 150 benchmarks/gpu_data.sh"
)
for part in "${PARTS[@]}"; do
    read -r name limit script <<< "$part"
    if [ $# -eq 0 ] || [[ " $* " == *" $name "* ]]; then
        [ -f "$script" ] && run_part "$name" "$limit" "$script"
    fi
done
mkdir -p "$FINAL"
tar czf "$FINAL/gpu_results.tgz" -C "$WORK" .
