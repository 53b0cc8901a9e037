#!/usr/bin/env bash
# DALI on a GPU: the GPU-marked DALI tests and images/s of pil (baseline, same machine) and dali (GPU)
# at 256 px with the pretraining augmentation. Needs nvidia-dali-cuda130 importable on the GPU machine
# (PYTHONPATH is kept by gpu_env.sh). Its wheels (~260 MB with dependencies) exceed the 64 MiB a device call
# carries: they travel as one tar.xz of the installed tree (other Pythons' extension modules removed, the
# libraries stripped: 174 MB) split into three 58 MB pieces, one carried folder per call, each copied to
# /tmp on the warm machine, then joined and unpacked to /tmp/site (PYTHONPATH). Without DALI this script
# runs the tests that need none, and exits with a message instead of reporting anything else. The tokenizer
# needs ALBEF_FAST_VOCAB (the vocab.txt `make venv` installs) on that machine.
#   run: bash benchmarks/gpu_data.sh            (results in $OUT)
set -uo pipefail
source benchmarks/gpu_env.sh
# the torch CUDA equalize path needs no DALI; the DALI tests skip themselves when it is missing
python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_dali_gpu.py 2>&1 | tee "$OUT/dali_gpu_tests.log"
if ! python3 -c "import nvidia.dali, webdataset" 2>"$OUT/dali_import.txt"; then
  echo "nvidia-dali / webdataset not importable here: DALI on the GPU stays unmeasured" | tee -a "$OUT/dali_import.txt"
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device_data.txt"
W=$(( $(nproc) > 8 ? 8 : $(nproc) ))
# images/s through the loader (pil = baseline, same run) and, with --breakdown, where the DALI time goes
# (stages alone: host workers, DALI stage, without Equalize, without RandomAugment, and the DALI stage on
# DALI's asynchronous executor with two batches in flight: dali-pipelined), with 8 DALI threads
# (nvJPEG's host-side Huffman decoding runs on them; 8 beat 4, 12 and 16 on an H200 in session 4); then
# the same with every JPEG sent to the hardware decoder (DALI's default sends 65 %)
python3 benchmarks/bench_dataloader.py --backends pil dali --images 512 --batch 64 --workers "$W" \
    --dali-threads 8 --epochs 3 --breakdown --csv "$OUT/dataloader.csv" 2>&1 | grep -v WARNING | tee "$OUT/bench_dataloader.log"
python3 benchmarks/bench_dataloader.py --backends dali --images 512 --batch 64 --workers "$W" \
    --dali-threads 8 --hw-decoder-load 1.0 --epochs 3 --breakdown --csv "$OUT/dataloader.csv" 2>&1 \
    | grep -v WARNING | tee -a "$OUT/bench_dataloader.log"
