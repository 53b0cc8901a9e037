# Sourced by the GPU scripts (run from the repository root on a lent GPU machine): output folder,
# and `albef_kernels` importable from the source tree without installing the package.
OUT=${OUT:-/tmp/albef_gpu_out}
mkdir -p "$OUT" /tmp/pp
ln -sfn "$PWD/kernels" /tmp/pp/albef_kernels   # the import name setup.py gives kernels/
export PYTHONPATH="$PWD:/tmp/pp${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1  # keeps carried wheels' paths
# device_info FILE: the GPU (name, memory, driver, max SM clock) and torch/triton versions, shown and
# saved as $OUT/FILE
device_info() {
    { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
      python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    } 2>&1 | tee "$OUT/$1"
}
# gpu_tests SECONDS LOG PYTEST_ARGS...: the GPU tests named, with a time limit, output shown and saved as
# $OUT/LOG, followed by the pytest exit status
gpu_tests() {
    local limit=$1 log=$2
    shift 2
    timeout "$limit" python3 -m pytest -q -s -p no:cacheprovider --durations=0 "$@" 2>&1 | tee "$OUT/$log"
    echo "tests rc=${PIPESTATUS[0]}" | tee -a "$OUT/$log"
}
